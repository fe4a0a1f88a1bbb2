"""The training loop's building blocks: optimizers, schedules, batching, shuffling, parameter counts."""

from __future__ import annotations

import pytest
import torch

from ftcli.adapt import count_params
from ftcli.data.tokenize import IGNORE_INDEX, collate
from ftcli.recipe import recipe_from_mapping
from ftcli.train import build_optimizer, build_scheduler, epoch_order


def recipe(optimizer=None, scheduler=None, kind="full"):
    return recipe_from_mapping(
        {
            "name": "t",
            "task": "classification",
            "model": {"name": "m"},
            "data": {"path": "d.csv", "label_column": "label"},
            "method": {"kind": kind},
            "train": {
                "optimizer": optimizer or {"name": "adamw", "lr": 1.0e-2},
                "scheduler": scheduler or {"name": "constant"},
            },
        }
    )


@pytest.mark.parametrize(
    "name", ["adamw", "adam", "sgd", "rmsprop", "adamw8bit", "paged_adamw", "paged_adamw8bit"]
)
def test_every_optimizer_builds_and_descends(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    x, y = torch.randn(128, 64), torch.randn(128, 1)
    lr = 1.0e-2 if name == "sgd" else 1.0e-3
    opt = build_optimizer(recipe({"name": name, "lr": lr, "weight_decay": 0.01}), model)
    expected = {
        "adamw": "AdamW",
        "adam": "Adam",
        "sgd": "SGD",
        "rmsprop": "RMSprop",
        "adamw8bit": "AdamW8bit",
        "paged_adamw": "PagedAdamW",
        "paged_adamw8bit": "PagedAdamW8bit",
    }[name]
    assert type(opt).__name__ == expected  # the name picks that optimizer, not a look-alike
    # weight decay applies to matrices only, never to biases
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.25, 0.5, 0.75, 1.0, 0.8, 0.6, 0.4, 0.2]),
    ],
)
def test_warmup_schedules(name, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    r = recipe({"name": "sgd", "lr": 1.0}, {"name": name, "warmup_steps": 4})
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(r, opt, total_steps=9)
    seen = []
    for _ in range(8):
        opt.step()
        sched.step()
        seen.append(round(opt.param_groups[0]["lr"], 4))
    assert seen == expected


def test_cosine_ends_near_zero_and_ratio_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        recipe({"name": "sgd", "lr": 1.0}, {"name": "cosine", "warmup_ratio": 0.1}), opt, 100
    )
    lrs = []
    for _ in range(100):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert (
        lrs[9] == pytest.approx(1.0) and lrs[-1] < 1e-3 and lrs[54] == pytest.approx(0.5, abs=0.02)
    )


def test_plateau_halves_after_patience():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        recipe({"name": "sgd", "lr": 1.0}, {"name": "plateau", "factor": 0.5, "patience": 1}),
        opt,
        10,
    )
    for v in (1.0, 0.9, 0.95, 0.96):
        sched.step(v)
    assert opt.param_groups[0]["lr"] == 0.5


def test_collate_pads_right_and_ignores_pad_labels():
    b = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
    )
    pad = [0] * 5  # the width rounds up to PAD_MULTIPLE (8)
    assert b["input_ids"].tolist() == [[5, 6, 7, *pad], [8, 0, 0, *pad]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, *pad], [1, 0, 0, *pad]]
    no = [IGNORE_INDEX] * 5
    assert b["labels"].tolist() == [[-100, 6, 7, *no], [8, IGNORE_INDEX, IGNORE_INDEX, *no]]
    c = collate([{"input_ids": [1], "labels": 1}, {"input_ids": [2, 3], "labels": 0}], pad_id=0)
    assert c["labels"].tolist() == [1, 0]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=0)
    assert a == epoch_order(50, seed=3, epoch=0) and sorted(a) == list(range(50))
    assert a != epoch_order(50, seed=3, epoch=1) and a != epoch_order(50, seed=4, epoch=0)


def test_lora_parameter_arithmetic_on_a_768_projection():
    """The issue's example: LoRA r=8 on one 768x768 query trains 12,288 of 589,824 weights."""
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(768, 768, bias=False)
            self.other = torch.nn.Linear(768, 768, bias=False)

        def forward(self, x):
            return self.other(self.query(x))

    model = get_peft_model(Block(), LoraConfig(r=8, lora_alpha=16, target_modules=["query"]))
    counts = count_params(model)
    assert counts.lora == counts.trainable == 8 * (768 + 768) == 12_288
    assert counts.adapted_weights == 589_824 and counts.adapted_modules == 1
    assert counts.total == 2 * 589_824 + 12_288
    assert counts.examples["query"] == {"shape": [768, 768], "lora": 12_288, "weights": 589_824}


def test_collate_pads_left_when_asked():
    b = collate(
        [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}],
        pad_id=0,
        left=True,
    )
    pad = [0] * 5  # to PAD_MULTIPLE, on the left too
    assert b["input_ids"].tolist() == [[*pad, 5, 6, 7], [*pad, 0, 0, 8]]
    assert b["attention_mask"].tolist() == [[*pad, 1, 1, 1], [*pad, 0, 0, 1]]
    assert b["labels"].tolist() == [1, 0]
