"""Preference and reward training in ftcli's own loop (issue 23), on tiny models and pair
features built here as the data stage tokenizes them (prompt tokens labelled -100, the answer
and EOS labelled with their ids).

The reference with the adapter disabled equals the start model loaded apart; a precomputed
reference gives the live reference's first-step loss; a reward model learns a separable pair set;
an interrupted run resumes exactly; every loss trains and logs its pair metrics.
"""

from __future__ import annotations

import json
import random
from functools import partial

import pytest
import torch
from accelerate.utils import set_seed

from ftcli.adapt import adapt
from ftcli.data.tokenize import IGNORE_INDEX, Tokenized
from ftcli.errors import Interrupted
from ftcli.models import load_reference, tokenizer_from
from ftcli.pipeline import make_accelerator
from ftcli.recipe import recipe_from_mapping
from ftcli.train import train
from ftcli.train.objectives import (
    PairObjective,
    collate_kto,
    collate_pairs,
    evaluate_pairs,
    sequence_logps,
)
from ftcli.ui import UI
from tests.conftest import NEGATIVE, POSITIVE, tiny_recipe


def _encode(tok, prompt: str, answer: str):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [IGNORE_INDEX] * len(p) + a


def arithmetic_pairs(tok, n: int, seed: int = 0) -> list[dict]:
    """what is a plus b ? -> the right sum chosen, a wrong one rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + rng.randrange(1, 5)) % 19
        prompt = f"what is {a} plus {b} ?"
        ci, cl = _encode(tok, prompt, f"{a} plus {b} is {a + b} .")
        ri, rl = _encode(tok, prompt, f"{a} plus {b} is {wrong} .")
        rows.append(
            {
                "chosen_input_ids": ci,
                "chosen_labels": cl,
                "rejected_input_ids": ri,
                "rejected_labels": rl,
                "length": max(len(ci), len(ri)),
            }
        )
    return rows


def sentiment_pairs(tok, n: int, seed: int = 0) -> list[dict]:
    """A separable set for a reward model: the chosen answer has a positive word, the rejected
    one a negative word, in the same frame."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "the film was"
        ci, cl = _encode(tok, prompt, f"really {rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}")
        ri, rl = _encode(tok, prompt, f"really {rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}")
        rows.append(
            {
                "chosen_input_ids": ci,
                "chosen_labels": cl,
                "rejected_input_ids": ri,
                "rejected_labels": rl,
                "length": max(len(ci), len(ri)),
            }
        )
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    """Unpaired rows: each pair gives a desirable and an undesirable row."""
    out = []
    for p in pairs:
        for side, good in (("chosen", 1), ("rejected", 0)):
            ids = p[f"{side}_input_ids"]
            out.append(
                {
                    "input_ids": ids,
                    "labels": p[f"{side}_labels"],
                    "desirable": good,
                    "length": len(ids),
                }
            )
    return out


def _recipe(tmp_path, tiny_models, tiny_data, task="preference", kind="lora", **pref):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", kind=kind, arch="llama")
    m["task"] = task
    m["data"] = {"path": str(tiny_data["chat"]), "max_length": 64}
    m["name"] = f"{task}-{kind}"
    m["train"].update(epochs=1, batch_size=8, log_every=1, optimizer={"name": "adamw", "lr": 1e-2})
    m["merge"] = {"enabled": False}
    if pref:
        m["preference"] = pref
    return m


def _split(feats) -> Tokenized:
    n = sum(len(f.get("chosen_input_ids", f.get("input_ids"))) for f in feats)
    return Tokenized(features=feats, truncated=0, dropped_no_target=0, tokens=n)


def _train(recipe, train_feats, val_feats=(), resume=False, progress=None):
    recipe.run_dir.mkdir(parents=True, exist_ok=True)  # the pipeline's _write_start does this
    acc, device = make_accelerator(recipe, UI())
    set_seed(recipe.train.seed)  # as the pipeline: the adapter's initial weights are seeded
    tok = tokenizer_from(recipe.model.name)
    adapted = adapt(recipe, tok, recipe.model.name, None, device)
    tokenized = {"train": _split(train_feats)}
    if val_feats:
        tokenized["validation"] = _split(list(val_feats))
    load_ref = partial(load_reference, recipe, adapted.model_dir, tok, device)
    trained = train(
        recipe,
        acc,
        adapted,
        tokenized,
        recipe.run_dir,
        resume=resume,
        progress=progress,
        load_reference=load_ref,
    )
    return trained, adapted


def _metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def tok(tiny_models):
    return tokenizer_from(tiny_models["llama"])


@pytest.mark.parametrize("kind", ["lora", "ia3", "vera", "prefix", "prompt", "ptuning"])
def test_disabled_adapter_reference_equals_the_start_model_loaded_apart(
    tmp_path, tiny_models, tiny_data, tok, kind
):
    m = _recipe(tmp_path, tiny_models, tiny_data)
    if kind != "lora":
        targets = {"ia3": ["q_proj", "v_proj", "down_proj"], "vera": ["q_proj", "v_proj"]}
        m["method"] = {
            "kind": kind,
            **({"target_modules": targets[kind]} if kind in targets else {}),
        }
    recipe = recipe_from_mapping(m)
    adapted = adapt(recipe, tok, recipe.model.name, None, "cpu")
    model = adapted.model
    with torch.no_grad():  # move the adapter away from its start: the policy is no longer it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    batch = collate_pairs(arithmetic_pairs(tok, 6), tok.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    objective = PairObjective.of(recipe, "adapter")
    ref = objective.reference_logps(model, *args)
    start = load_reference(recipe, adapted.model_dir, tok, "cpu")
    with torch.no_grad():
        apart, _ = sequence_logps(start, *args)
        policy, _ = sequence_logps(model.eval(), *args)
    assert torch.allclose(ref, apart, atol=1e-5, rtol=0), (ref, apart)
    assert (policy - apart).abs().max() > 1e-2  # and the adapter really changed the policy
    # no second copy: the adapter reference holds no other model
    assert objective.ref_model is None


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_precomputed_and_live_references_give_the_same_first_step_loss(
    tmp_path, tiny_models, tiny_data, tok, loss, capsys
):
    pairs = arithmetic_pairs(tok, 16)
    feats = kto_rows(pairs) if loss == "kto" else pairs
    losses = []
    for i, pre in enumerate((False, True, True)):
        m = _recipe(tmp_path / str(i), tiny_models, tiny_data, loss=loss, precompute_reference=pre)
        m["train"].update(max_steps=1)
        r = recipe_from_mapping(m)
        _train(r, feats)
        losses.append(_metrics(r.run_dir)[0])
    live, first, again = losses
    assert abs(live["loss"] - first["loss"]) < 1e-5, (live, first)
    assert first["loss"] == again["loss"]  # the second precomputed run read the cached scores
    assert abs(live["kl_chosen"] - first["kl_chosen"]) < 1e-4


def test_precompute_is_cached_with_the_data_and_reused(tmp_path, tiny_models, tiny_data, tok):
    from ftcli.data.store import data_cache_dir

    pairs = arithmetic_pairs(tok, 16, seed=3)
    m = _recipe(tmp_path, tiny_models, tiny_data, precompute_reference=True)
    m["train"].update(max_steps=1)
    r = recipe_from_mapping(m)
    before = set((data_cache_dir() / "reference").glob("*.pt"))
    _train(r, pairs)
    made = set((data_cache_dir() / "reference").glob("*.pt")) - before
    assert len(made) == 1
    stamp = next(iter(made)).stat().st_mtime_ns
    _train(recipe_from_mapping({**m, "name": "again"}), pairs)
    assert set((data_cache_dir() / "reference").glob("*.pt")) - before == made
    assert next(iter(made)).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_every_loss_trains_and_logs_its_pair_metrics(tmp_path, tiny_models, tiny_data, tok, loss):
    pairs = arithmetic_pairs(tok, 48)
    feats = kto_rows(pairs) if loss == "kto" else pairs
    m = _recipe(tmp_path, tiny_models, tiny_data, loss=loss)
    m["train"].update(epochs=2)
    if loss in ("ipo", "kto"):  # their objectives oscillate at 1e-2 on this tiny model
        m["train"].update(epochs=3, optimizer={"name": "adamw", "lr": 1e-3})
    r = recipe_from_mapping(m)
    trained, adapted = _train(r, feats, val_feats=feats[:8])
    rows = _metrics(r.run_dir)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in rows)
    assert {"logps_chosen", "logps_rejected"} <= rows[0].keys()
    if loss != "kto":
        assert {"reward_accuracy", "reward_margin"} <= rows[0].keys()
    if loss in ("dpo", "ipo", "kto"):
        assert "kl_chosen" in rows[0]
        assert abs(rows[0]["kl_chosen"]) < 1e-4  # the policy starts at the reference
    else:
        assert "kl_chosen" not in rows[0]
    assert trained.best_val_loss is not None
    # the objective fell over the whole training set: the trained policy against the start
    start = adapt(r, tok, r.model.name, None, "cpu").model  # B = 0: the start itself
    assert _mean_loss(r, adapted.model, feats, tok) < _mean_loss(r, start, feats, tok) - 1e-4


def _mean_loss(recipe, model, feats, tok) -> float:
    """The recipe's pair loss over ``feats``, in eval mode, the reference the adapter-disabled
    policy (the start: the adapter is new)."""
    from ftcli.train.objectives import KtoRows, reference_mode

    objective = PairObjective.of(recipe, reference_mode(recipe))
    unpaired = "desirable" in feats[0]
    rows = KtoRows(feats) if unpaired else feats
    batch = (collate_kto if unpaired else collate_pairs)(list(rows), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        s, n, _ = objective.sums(model, batch)
    return (s / n).item()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_reward_model_accuracy_rises_on_a_separable_pair_set(
    tmp_path, tiny_models, tiny_data, tok, kind
):
    train_pairs, test_pairs = sentiment_pairs(tok, 64, seed=1), sentiment_pairs(tok, 32, seed=2)
    m = _recipe(tmp_path, tiny_models, tiny_data, task="reward", kind=kind)
    if kind == "full":
        m["train"]["optimizer"]["lr"] = 1e-3
    m["train"].update(epochs=4)
    r = recipe_from_mapping(m)
    acc, device = make_accelerator(r, UI())
    set_seed(0)
    adapted = adapt(r, tok, r.model.name, None, device)
    before = evaluate_pairs("reward", adapted.model, test_pairs, tok.pad_token_id, 16, "cpu")
    r.run_dir.mkdir(parents=True)
    trained = train(r, acc, adapted, {"train": _split(train_pairs)}, r.run_dir)
    after = evaluate_pairs("reward", adapted.model, test_pairs, tok.pad_token_id, 16, "cpu")
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"], (before, after)
    rows = _metrics(r.run_dir)
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= rows[
        -1
    ].keys()
    # the saved reward model loads back as a one-logit classifier
    from ftcli.models import load_trained

    model, _ = load_trained(r.run_dir, "reward")
    assert model.config.num_labels == 1
    again = evaluate_pairs("reward", model, test_pairs, tok.pad_token_id, 16, "cpu")
    assert abs(again["accuracy"] - after["accuracy"]) < 1e-9
    assert trained.steps > 0


class _InterruptAt:
    def __init__(self, step):
        self.step = step

    def start(self, *_):
        pass

    def stop(self):
        pass

    def note(self, *_):
        pass

    def update(self, step, **_):
        if step == self.step:
            raise KeyboardInterrupt


def test_interrupted_preference_run_resumes_exactly(tmp_path, tiny_models, tiny_data, tok):
    from safetensors.torch import load_file

    pairs = arithmetic_pairs(tok, 40, seed=5)
    m = _recipe(tmp_path, tiny_models, tiny_data, loss="dpo")
    m["method"]["dropout"] = 0.2  # dropout draws random numbers: resume must restore the RNG
    m["train"].update(
        epochs=2,
        batch_size=4,
        gradient_accumulation=2,
        checkpoint_every=100,
        scheduler={"name": "linear", "warmup_ratio": 0.1},
    )
    straight = recipe_from_mapping({**m, "output_dir": str(tmp_path / "a")})
    broken = recipe_from_mapping({**m, "output_dir": str(tmp_path / "b")})
    _train(straight, pairs)
    total = max(x["step"] for x in _metrics(straight.run_dir))
    cut = total // 2 + 1  # mid-epoch, not on a checkpoint boundary
    with pytest.raises(Interrupted) as info:
        _train(broken, pairs, progress=_InterruptAt(cut))
    assert info.value.step == cut
    trained, _ = _train(broken, pairs, resume=True)
    assert trained.resumed_from == cut
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(straight.run_dir) and [
        {k: v for k, v in x.items() if k not in ("tokens_per_s", "s_per_step", "elapsed_s")}
        for x in _metrics(straight.run_dir)
    ] == [
        {k: v for k, v in x.items() if k not in ("tokens_per_s", "s_per_step", "elapsed_s")}
        for x in _metrics(broken.run_dir)
    ]


def test_kto_collate_builds_mismatched_sequences(tok):
    from ftcli.train.objectives import KtoRows

    rows = KtoRows(kto_rows(arithmetic_pairs(tok, 3)))
    batch = collate_kto([rows[i] for i in range(len(rows))], tok.pad_token_id)
    r0, r1 = rows[0], rows[1]
    cut = next(i for i, y in enumerate(r0["labels"]) if y != IGNORE_INDEX)
    at = next(i for i, y in enumerate(r1["labels"]) if y != IGNORE_INDEX)
    assert r0["kl_input_ids"] == r0["input_ids"][:cut] + r1["input_ids"][at:]
    assert batch["kl_input_ids"].shape[0] == len(rows) and batch["desirable"].tolist()[:2] == [
        True,
        False,
    ]


# --------------------------------------------------------------------------- the whole pipeline


def _pairs_file(path, n: int = 48, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + rng.randrange(1, 5)) % 19
        rows.append(
            {
                "prompt": f"what is {a} plus {b} ?",
                "chosen": f" {a} plus {b} is {a + b} .",
                "rejected": f" {a} plus {b} is {wrong} .",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "task, kind, pref",
    [
        ("preference", "lora", {"loss": "dpo", "precompute_reference": True}),
        ("preference", "full", {"loss": "dpo"}),
        ("preference", "lora", {"loss": "kto"}),
        ("reward", "lora", None),
    ],
)
def test_train_run_from_a_pairs_file(tmp_path, tiny_models, tiny_data, task, kind, pref):
    """prepare -> adapt -> train -> evaluate -> merge on a pairs file, as `ftcli train` runs it."""
    from ftcli.pipeline import train_run

    m = _recipe(tmp_path, tiny_models, tiny_data, task=task, kind=kind, **(pref or {}))
    m["data"] = {"path": str(_pairs_file(tmp_path / "pairs.jsonl")), "max_length": 64}
    m["data"]["split"] = {"validation": 0.1, "test": 0.2, "seed": 0}
    m["train"].update(epochs=1, batch_size=4)
    m["merge"] = {"enabled": kind != "full"}
    out = train_run(recipe_from_mapping(m), UI())
    assert out["status"] == "completed"
    rows = _metrics(recipe_from_mapping(m).run_dir)
    assert rows and "reward_margin" in rows[-1] or pref and pref["loss"] == "kto"
    metrics = out.get("eval", {}).get("metrics", {})
    assert (
        ("accuracy" in metrics)
        if task == "reward"
        else ("logp_accuracy" in metrics or pref["loss"] == "kto")
    )
    if kind != "full":
        assert out["merge"]["prediction_agreement"] > 0.9


def test_a_run_folder_as_the_start_and_its_adapter_disabled_reference(
    tmp_path_factory, tmp_path, tiny_models, tiny_data, tok
):
    """model.name: an earlier (full) run folder starts from its trained weights; the LoRA
    policy's disabled adapter then scores exactly as that trained model, loaded apart."""
    from ftcli.models import load_trained, run_folder_start
    from tests.conftest import trained_run

    sft = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "full")
    m = _recipe(tmp_path, tiny_models, tiny_data)
    m["model"] = {"name": str(sft)}
    recipe = recipe_from_mapping(m)
    start = run_folder_start(str(sft))
    assert start == sft / "model"
    from ftcli.models import load_tokenizer

    t, _, model_dir = load_tokenizer(recipe.model)
    adapted = adapt(recipe, t, model_dir, None, "cpu")
    batch = collate_pairs(arithmetic_pairs(t, 6), t.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = PairObjective.of(recipe, "adapter").reference_logps(adapted.model, *args)
    trained, _ = load_trained(sft, "causal_lm")
    with torch.no_grad():
        apart, _ = sequence_logps(trained, *args)
    assert torch.allclose(ref, apart, atol=1e-5, rtol=0)
