"""The bundled recipes on the real small models of ASSETS.md, cut short: MiniLM-L6 learns sentiment
with LoRA, and SmolLM2-135M keeps learning under QLoRA after an evaluation pass
(docs/traps.md#cpu-qlora-repacking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcli.bundled import recipe_path
from ftcli.pipeline import train_run
from ftcli.recipe import load_recipe
from ftcli.ui import UI

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_minilm_lora_learns_sentiment(tmp_path):
    r = load_recipe(
        recipe_path("quickstart"),
        [
            f"output_dir={tmp_path}",
            "train.mixed_precision=no",  # not `auto`: bf16 or fp32 by the CPU's flags
            "data.max_train_examples=2048",
            "data.max_validation_examples=64",
            "data.max_test_examples=400",
            "train.eval_every=20",
            "merge.enabled=false",
        ],
    )
    out = train_run(r, UI())
    assert out["mixed_precision"] == "no"
    losses = [x["loss"] for x in _metrics(r.run_dir) if "loss" in x]
    assert losses[-1] < losses[0]
    acc = out["eval"]["metrics"]["accuracy"]
    assert acc > 0.62, (
        f"64 LoRA steps should lift MiniLM well above chance (0.5) on 400 test reviews; got {acc}"
    )


def test_smollm2_qlora_keeps_learning_after_evaluation(tmp_path):
    """The QLoRA recipe on the real 4-bit SmolLM2: loss falls, and the adapter keeps moving after the
    validation pass at step 4 (on AVX512-BF16 CPUs bitsandbytes would otherwise freeze it)."""
    r = load_recipe(
        recipe_path("smollm2-sentiment-qlora"),
        [
            # 4 epochs over 32 reviews: the training loss on them must fall (8 steps, a validation pass at 4)
            f"output_dir={tmp_path}",
            "train.mixed_precision=no",  # not `auto`: bf16 or fp32 by the CPU's flags
            "train.epochs=4",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.log_every=1",
            "data.max_train_examples=32",
            "data.max_validation_examples=32",
            "data.max_test_examples=64",
            "data.max_length=48",
            "merge.enabled=false",
        ],
    )
    out = train_run(r, UI())
    assert out["mixed_precision"] == "no"
    rows = _metrics(r.run_dir)
    assert [x["step"] for x in rows if "val_loss" in x] == [4, 8]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert sum(losses[-2:]) < 0.75 * sum(losses[:2]), losses
    mid = load_file(str(r.run_dir / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    final = load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors"))
    moved = [
        k
        for k, v in mid.items()
        if "lora_B" in k and not torch.equal(v, final[k.replace(".default", "")])
    ]
    assert len(moved) == sum("lora_B" in k for k in mid), (
        "some LoRA weights froze after the evaluation pass"
    )
    assert out["params"]["adapted_modules"] == 30  # q_proj in each of SmolLM2's 30 layers
