"""Loading: every problem at once in line order, YAML errors, --set overrides, run folders, and
``extends:`` composition."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from ftcli.errors import FtcliError, RecipeError
from ftcli.recipe import load_recipe, parse_override
from tests.unit.recipe.samples import GOOD, messages, write


def test_all_problems_are_reported_at_once_in_line_order(tmp_path):
    text = (
        GOOD.replace("task: classification", "task: clasification")
        .replace("  r: 8\n", "  r: 0\n")
        .replace("batch_size: 32", "batch_size: many")
    )
    msgs = messages(tmp_path, text)
    assert msgs == [
        f"{tmp_path}/recipe.yaml:2: task: 'clasification' is not one of: classification, causal_lm, "
        "preference, reward "
        "(did you mean 'classification'?)",
        f"{tmp_path}/recipe.yaml:11: method.r: input should be greater than 0 (got 0)",
        f"{tmp_path}/recipe.yaml:16: train.batch_size: input should be a valid integer, unable to parse string "
        "as an integer (got 'many')",
    ]


def test_invalid_yaml_names_the_line(tmp_path):
    msgs = messages(tmp_path, GOOD.replace("  r: 8\n", "  r: [8\n"))
    assert (
        len(msgs) == 1
        and msgs[0].startswith(f"{tmp_path}/recipe.yaml:")
        and "not valid YAML" in msgs[0]
    )


def test_overrides_apply_before_validation_and_are_located(tmp_path):
    p = write(tmp_path, GOOD)
    r = load_recipe(p, ["train.optimizer.lr=1e-4", "method.r=16", "method.target_modules=[query]"])
    assert r.train.optimizer.lr == 1e-4 and isinstance(
        r.train.optimizer.lr, float
    )  # docs/traps.md#yaml-floats-without-a-dot: 1e-4 is a number
    assert r.method.r == 16 and r.method.target_modules == ["query"]
    with pytest.raises(RecipeError) as info:
        load_recipe(p, ["method.r=-1", "train.optimizer.lrr=1"])
    msgs = [x.render() for x in info.value.problems]
    assert msgs == [
        "--set: method.r: input should be greater than 0 (got -1)",
        "--set: train.optimizer.lrr: unknown key (did you mean train.optimizer.lr?)",
    ]


def test_override_syntax_errors():
    with pytest.raises(FtcliError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(FtcliError, match="is not a dotted key"):
        parse_override("train..epochs=1")


def test_run_folder_is_accepted_as_a_recipe(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(GOOD)
    assert load_recipe(run).name == "demo"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FtcliError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- extends


def _write_at(path, text):
    path.write_text(textwrap.dedent(text))
    return path


BASE_YAML = """\
name: base
task: classification
model: {name: m}
data:
  path: d.csv
  label_column: label
method:
  kind: lora
  r: 8
  target_modules: [query, value]
train:
  epochs: 2
  optimizer: {name: adamw, lr: 1.0e-3}
"""


def test_extends_deep_merges_replaces_lists_and_null_removes(tmp_path):
    _write_at(tmp_path / "base.yaml", BASE_YAML)
    _write_at(
        tmp_path / "child.yaml",
        """\
        extends: base.yaml
        name: child
        method:
          target_modules: [query]
          dora: true
        train:
          optimizer: {lr: 5.0e-4}
          epochs: null
        """,
    )
    r = load_recipe(tmp_path / "child.yaml", ["train.batch_size=4"])
    assert r.name == "child" and r.method.r == 8 and r.method.dora
    assert r.method.target_modules == ["query"]  # lists replace
    assert r.train.optimizer.lr == 5e-4 and r.train.optimizer.name == "adamw"  # mappings merge
    assert r.train.epochs == 1.0  # null removed the base's 2: the default applies
    assert r.train.batch_size == 4  # --set applies last
    assert "extends" not in yaml.safe_load(r.to_yaml())  # the saved recipe is the flat result


def test_extends_chains_and_errors_name_the_file_the_value_came_from(tmp_path):
    _write_at(tmp_path / "base.yaml", BASE_YAML)
    _write_at(tmp_path / "mid.yaml", "extends: base.yaml\nmethod:\n  kind: ia3\n")
    _write_at(tmp_path / "top.yaml", "extends: mid.yaml\nname: top\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "top.yaml")
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/base.yaml:9: method.r: only applies to lora, qlora and vera, not to "
        "method.kind 'ia3' (remove it, or set method.kind to lora)"
    ]
    _write_at(tmp_path / "top.yaml", "extends: mid.yaml\nname: top\nmethod: {r: null}\n")
    r = load_recipe(tmp_path / "top.yaml")
    assert r.method.kind == "ia3" and r.name == "top"


def test_extends_cycle_and_missing_parent(tmp_path):
    _write_at(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    _write_at(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    a, b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/b.yaml:1: extends: extends forms a cycle: {a} -> {b} -> {a}"
    ]
    _write_at(tmp_path / "c.yaml", "name: c\nextends: nowhere.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "c.yaml")
    assert [p.render() for p in info.value.problems] == [
        f"{tmp_path}/c.yaml:2: extends: cannot find the recipe 'nowhere.yaml' (a path relative "
        "to this recipe, or a bundled recipe's name) (`ftcli recipes` lists the bundled ones)"
    ]


def test_extends_a_bundled_recipe_by_name(tmp_path):
    _write_at(tmp_path / "mine.yaml", "extends: quickstart\nname: mine\nmethod: {dora: true}\n")
    r = load_recipe(tmp_path / "mine.yaml")
    assert r.name == "mine" and r.method.dora and r.method.target_modules == ["query", "value"]
