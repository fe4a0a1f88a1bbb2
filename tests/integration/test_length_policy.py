"""The length policy through the whole pipeline: ``max_length: auto`` trains with a number that
the run folder records (recipe.yaml, data.json, run.json), so eval, predict and merge read that
number; ``long_documents: windows`` trains on windows and scores documents."""

from __future__ import annotations

import csv
import json
import random

import yaml

from ftcli.merge import merge
from ftcli.pipeline import evaluate_run, train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.rundir import open_run
from ftcli.serve.predictor import load_predictor
from ftcli.ui import UI
from tests.conftest import sentiment_rows, tiny_recipe


def test_auto_length_and_windows_end_to_end(tmp_path, tiny_models, tiny_data, capsys):
    rows = sentiment_rows(120)
    rng = random.Random(0)
    for r in rng.sample(rows, 12):  # documents longer than the tiny BERT's 128 positions
        r["text"] = " ".join([r["text"]] * 30)
    data = tmp_path / "long.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", arch="bert")
    m["data"].pop("max_length")  # auto, the default
    m["data"].update(path=str(data), long_documents="windows")
    m["train"].update(max_steps=4)
    recipe = recipe_from_mapping(m)
    assert recipe.data.max_length == "auto"
    record = train_run(recipe, UI())
    out = capsys.readouterr().out
    chosen = record["data"]["max_length"]
    assert chosen["value"] == 128 and "the model's 128 positions" in chosen["capped_by"]
    assert chosen["policy"] == "auto" and chosen["examples"] == len(
        open_run(recipe.run_dir).prepared.splits["train"]
    )
    assert f"max_length auto: {chosen['value']} (p99 of all" in out
    saved = yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())["data"]
    assert saved["max_length"] == chosen["value"] and saved["long_documents"] == "windows"
    data_json = json.loads((recipe.run_dir / "data" / "data.json").read_text())
    assert data_json["max_length"]["value"] == chosen["value"]
    # the long documents were read as several windows; the test metrics count documents
    tok = record["data"]["tokenized"]
    n_test = len(open_run(recipe.run_dir).prepared.splits["test"])
    assert record["eval"]["n"] == n_test
    assert sum(tok[s]["examples"] for s in tok) > sum(
        len(v) for v in open_run(recipe.run_dir).prepared.splits.values()
    )
    again = evaluate_run(recipe.run_dir, UI())
    assert again["n"] == n_test
    assert again["metrics"]["accuracy"] == record["eval"]["metrics"]["accuracy"]
    pred = load_predictor(str(recipe.run_dir))
    assert pred.windows and pred.max_length == chosen["value"]
    long_text = " ".join(["the film was good and the plot was great"] * 60)
    (one,) = pred.classify([long_text])
    assert sum(one["probs"].values()) == pytest_approx_one()
    merge(recipe.run_dir, tmp_path / "merged")  # reads the run's recipe: a number, not auto


def pytest_approx_one():
    import pytest

    return pytest.approx(1.0)
