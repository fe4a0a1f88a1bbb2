"""The schema: derived values, frozen sections, YAML booleans, and to_yaml's resolved recipe that
loads back to itself."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from ftcli.recipe import load_recipe, recipe_from_mapping
from tests.unit.recipe.samples import GOOD, mapping, messages, write


def test_good_recipe_loads_with_derived_values(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.method.scale == 2.0
    assert r.train.optimizer.lr == 5e-4
    assert str(r.run_dir) == "runs/demo"
    # frozen: nothing writes back into a recipe
    with pytest.raises(ValidationError):
        r.method.r = 4  # type: ignore[misc]


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    """`no` is false to YAML 1.1: in a file and through --set it still means no mixed precision."""
    (tmp_path / "reviews.csv").write_text("text,category\na,x\nb,y\n")
    r = load_recipe(write(tmp_path, GOOD), ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"
    r = load_recipe(
        write(tmp_path, GOOD.replace("  epochs: 2\n", "  epochs: 2\n  mixed_precision: no\n"))
    )
    assert r.train.mixed_precision == "no"
    assert messages(tmp_path, GOOD, ["train.mixed_precision=yes"]) == [
        "--set: train.mixed_precision: True is not one of: auto, no, bf16, fp16"
    ]


def test_classification_label_column_defaults_to_label():
    base = yaml.safe_load(GOOD)
    del base["data"]["label_column"]
    assert recipe_from_mapping(base).data.label_col == "label"  # the data check names it


def test_resolved_recipe_round_trips(tmp_path):
    for kind in ("full", "lora", "qlora"):
        text = GOOD.replace("kind: lora", f"kind: {kind}")
        if kind == "full":
            text = text.replace("  r: 8\n  alpha: 16\n  target_modules: [query, value]\n", "")
        r = load_recipe(write(tmp_path, text))
        again = load_recipe(write(tmp_path, r.to_yaml()))
        assert again.to_yaml() == r.to_yaml()  # resolving twice changes nothing
        assert again.method.quant == r.method.quant and again.train == r.train
        assert (
            again.data == r.data
            and again.model == r.model
            and again.method.target_modules == r.method.target_modules
        )


def test_every_new_key_loads_and_round_trips():
    m = mapping(
        {"kind": "lora", "dora": True, "rslora": True, "layers": [0, 1], "r": 4, "alpha": 8},
        {
            "optimizer": {"name": "adamw", "lr": 1.0e-3, "lora_plus_ratio": 16, "layer_decay": 0.8},
            "unfreeze": {"every_steps": 50, "start_layers": 2},
            "early_stopping": {"patience": 3, "min_delta": 0.0},
        },
        model={"name": "m", "head": {"hidden": 256, "dropout": 0.1}},
    )
    r = recipe_from_mapping(m)
    assert r.method.scale == 8 / 2  # rsLoRA: alpha / sqrt(r)
    again = recipe_from_mapping(yaml.safe_load(r.to_yaml()))
    assert again.to_yaml() == r.to_yaml() and again.method == r.method
    for kind in ("ia3", "prefix", "prompt", "ptuning", "vera", "full"):
        r = recipe_from_mapping(mapping({"kind": kind}))
        # no inapplicable key left behind to refuse on reload
        assert recipe_from_mapping(yaml.safe_load(r.to_yaml())).to_yaml() == r.to_yaml()
