"""bench/train_speed.py's recipe overrides load cleanly for every method kind on both devices.

Before the fix every side of the CUDA speed bench failed: it set
method.quantization.compute_dtype on LoRA recipes, where that key is a recipe error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ftcli.bundled import recipe_path
from ftcli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize(
    ("recipe", "kind"),
    [
        ("smollm2-chat-lora", "lora"),
        ("quickstart", "lora"),
        ("smollm2-sentiment-qlora", "qlora"),
        ("smollm2-sentiment-full", "full"),
    ],
)
def test_overrides_load_for_each_kind(recipe: str, kind: str, device: str):
    ts = _train_speed()
    path = recipe_path(recipe)
    assert load_recipe(path, []).method.kind == kind
    sets = ts.bench_overrides(kind, device, 5, 4, ["train.seed=3"])
    r = load_recipe(path, sets)  # a RecipeError fails the test
    assert (r.train.max_steps, r.train.batch_size, r.train.device, r.train.seed) == (
        5,
        4,
        device,
        3,
    )
    assert not r.merge.enabled
    quant = [s for s in sets if s.startswith("method.quantization.")]
    if kind == "qlora" and device == "cuda":
        assert r.method.quant.compute_dtype == "bfloat16"
    else:
        assert quant == []  # only QLoRA on CUDA gets a compute dtype


def test_lora_with_compute_dtype_is_the_error_the_bench_avoids():
    from ftcli.errors import RecipeError

    with pytest.raises(RecipeError, match="only applies to method.kind 'qlora'"):
        load_recipe(
            recipe_path("smollm2-sentiment-lora"), ["method.quantization.compute_dtype=bfloat16"]
        )
