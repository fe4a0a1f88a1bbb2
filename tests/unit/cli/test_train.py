"""``ftcli validate`` and ``ftcli recipes`` (ftcli/cli/train.py): data problems found without a
model, located, all at once; hub data offline; the bundled list (issues 11 and 16)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.tickets import ROWS, tickets_recipe, write_csv


def test_missing_relative_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from ftcli.cli import main

    proj = tmp_path / "proj"
    proj.mkdir()
    recipe = tickets_recipe(proj, "tikets.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(recipe)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert (
        f"{recipe}:6: data.path: data not found: {proj / 'tikets.csv'} (no such file or folder) "
        f"('tikets.csv' was looked for in {proj} (a recipe's relative paths are read from its "
        "own folder))"
    ) in err
    # with a schema problem beside it, the data problem keeps where it was looked for
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "lroa"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SystemExit):
        main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert "2 problems in the recipe:" in err and f"'tikets.csv' was looked for in {proj}" in err


def _validate(capsys, *args):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate", *args, "--json"])
    return exc.value.code, json.loads(capsys.readouterr().out)


def test_validate_finds_label_values_the_data_lacks(tmp_path, capsys):
    write_csv(tmp_path / "tickets.csv", ROWS)
    code, out = _validate(capsys, str(tickets_recipe(tmp_path, labels=["billing", "bug", "other"])))
    assert code == 1
    assert "data.labels: label(s) 'billing', 'bug', 'other' never occur in the data" in out["error"]
    assert "labels found: '0' (20), '1' (20), '2' (20)" in out["error"]


def test_validate_reports_schema_and_data_problems_together(tmp_path, capsys):
    write_csv(tmp_path / "tickets.csv", ROWS)
    recipe = tickets_recipe(tmp_path, text_column="txt")
    doc = yaml.safe_load(recipe.read_text())
    doc["method"]["kind"] = "lroa"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out = _validate(capsys, str(recipe))
    assert code == 1
    assert out["error"].startswith("2 problems in the recipe:")
    assert (
        "method.kind: 'lroa' is not one of: full, lora, qlora, ia3, prefix, prompt, ptuning, vera (did you mean 'lora'?)"
        in out["error"]
    )
    assert "data.text_column: column 'txt' is not in the data" in out["error"]


def test_validate_checks_column_types_and_split_sizes(tmp_path, capsys):
    rows = [{"text": f"t {i}", "n": i, "label": i % 2} for i in range(40)]
    write_csv(tmp_path / "tickets.csv", rows)
    code, out = _validate(capsys, str(tickets_recipe(tmp_path, text_column="n")))
    assert code == 1
    assert "data.text_column: column 'n' holds only numbers (e.g. '0'), not text" in out["error"]
    code, out = _validate(capsys, str(tickets_recipe(tmp_path)))
    assert code == 0, out
    assert out["checked"] == [
        "schema",
        "data columns",
        "labels and splits",
        "train 32, validation 4, test 4",
    ]
    code, out = _validate(
        capsys, str(tickets_recipe(tmp_path, max_test_examples=1, split={"test": 0.0}))
    )
    assert code == 1 and "the test split is empty" in out["error"]


def test_validate_passes_offline_with_an_uncached_hub_dataset(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "hub",
                "task": "classification",
                "model": {"name": "some/model"},
                "data": {"path": "nobody/never-cached-dataset", "label_column": "label"},
                "method": {"kind": "lora"},
            }
        )
    )
    code, out, err = cli("validate", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["checked"] == ["schema"]
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "data columns not checked" in lines[0]
    assert "nobody/never-cached-dataset" in lines[0] and "offline" in lines[0]
    code, _, _ = cli("validate", str(path), "--strict")
    assert code == 1


def test_recipes_lists_whole_paths(capsys, monkeypatch):
    from ftcli.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["recipes"])
    out = capsys.readouterr().out
    assert "recipes/gpu-llama-3.2-1b-qlora-alpaca.yaml" in out
    assert "…" not in out.split("what")[1].splitlines()[2][:50]
