"""Length grouping, token budgets and packing change only how examples are laid out: every
example is seen once per epoch, and one optimizer step's update is the mean over its real targets
whatever the micro-batch sizes (grouped or not, packed or not, k x b or 1 x kb)."""

from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file

from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.train import batch_cost, batch_plan
from ftcli.ui import UI
from tests.conftest import tiny_recipe


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 120) for _ in range(n)]


@pytest.mark.parametrize("kw", [{}, {"batch_tokens": 400}, {"batch_tokens": 400, "packed": True}])
def test_plan_sees_every_example_once_per_epoch_and_is_reproducible(kw):
    lengths = _lengths()
    for epoch in range(3):
        plan = batch_plan(lengths, 16, seed=5, epoch=epoch, **kw)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert plan == batch_plan(lengths, 16, seed=5, epoch=epoch, **kw)  # what --resume replays
    assert batch_plan(lengths, 16, 5, 0, **kw) != batch_plan(lengths, 16, 5, 1, **kw)
    # the heaviest micro-batch runs first, so the allocator's largest blocks are taken at step 1
    costs = [batch_cost(b, lengths, kw.get("packed", False)) for b in plan]
    assert costs[0] == max(costs) and costs[1:] != sorted(costs[1:], reverse=True)
    if "batch_tokens" in kw:
        assert all(c <= 400 or len(b) == 1 for b, c in zip(plan, costs, strict=True))


def test_grouping_cuts_padding():
    lengths = _lengths()

    def efficiency(plan):
        return sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in plan)

    plain = efficiency(batch_plan(lengths, 32, 0, 0, group=False))
    grouped = efficiency(batch_plan(lengths, 32, 0, 0, group=True))
    assert plain < 0.6 and grouped > 0.9, (plain, grouped)


def _one_step(tmp_path, tiny_models, tiny_data, task, name, data=None, **train):
    arch = "llama" if task == "causal_lm" else "llama-random"
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task=task, kind="lora", arch=arch)
    m["name"] = name
    m["merge"] = {"enabled": False}
    m["eval"] = {"batch_size": 32, "generate_examples": 0} if task == "causal_lm" else m["eval"]
    m["data"].update(data or {})
    # one SGD step over the whole training split: the update is lr x the gradient of the step's loss
    m["train"].update(
        max_steps=1,
        gradient_accumulation=1000,
        optimizer={"name": "sgd", "lr": 1.0},
        max_grad_norm=None,
        mixed_precision="no",  # bf16 rounding would differ with the layout
        **train,
    )
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    return load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors")), out["train"]


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_step_is_the_mean_over_real_targets_however_batched(tmp_path, tiny_models, tiny_data, task):
    ref, rec = _one_step(
        tmp_path,
        tiny_models,
        tiny_data,
        task,
        "ref",
        {"packing": False} if task == "causal_lm" else {},
        batch_size=512,
        group_by_length=False,
    )
    variants = {"grouped-k-micro": {"batch_size": 7}, "budget": {"batch_tokens": 300}}
    if task == "causal_lm":
        variants["packed"] = {"batch_size": 5}  # packing is the default for causal LMs
    for name, kw in variants.items():
        got, rec_v = _one_step(tmp_path, tiny_models, tiny_data, task, name, **kw)
        assert rec_v["tokens"] == rec["tokens"]  # the same real tokens were seen
        for k in ref:
            moved = (ref[k] - got[k]).abs().max().item()
            assert moved < 1e-5, (name, k, moved)
    if task == "causal_lm":
        assert rec_v["packed"] and not rec["packed"]
    else:  # the layout changed something real: less padding than one batch of everything
        assert rec_v["padding_efficiency"] > rec["padding_efficiency"]
