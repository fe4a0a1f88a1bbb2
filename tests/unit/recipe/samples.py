"""Recipes and helpers the recipe tests share."""

from __future__ import annotations

import copy
import textwrap

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe import load_recipe, recipe_from_mapping

GOOD = textwrap.dedent(
    """\
    name: demo
    task: classification
    model:
      name: some-org/some-model
    data:
      path: reviews.csv
      text_column: text
      label_column: category
    method:
      kind: lora
      r: 8
      alpha: 16
      target_modules: [query, value]
    train:
      epochs: 2
      batch_size: 32
      optimizer: {name: adamw, lr: 5.0e-4}
      scheduler: {name: linear, warmup_ratio: 0.06}
    """
)


def write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def messages(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return [p.render() for p in info.value.problems]


BASE = {
    "name": "t",
    "task": "classification",
    "model": {"name": "m"},
    "data": {"path": "d.csv", "label_column": "label"},
    "method": {"kind": "lora"},
}


def mapping(method=None, train=None, **top):
    m = copy.deepcopy(BASE)
    if method is not None:
        m["method"] = method
    if train is not None:
        m["train"] = train
    m.update(top)
    return m


def problems(m) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_mapping(m)
    return [p.render().removeprefix("<recipe>: ") for p in info.value.problems]
