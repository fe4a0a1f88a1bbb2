"""`ftcli cv --folds K` and `ftcli train --seeds N` on a tiny classifier."""

from __future__ import annotations

import json
import statistics

import pytest

from ftcli.data.examples import _key
from ftcli.util import read_jsonl
from tests.conftest import run_cli, tiny_recipe, write_recipe


def test_cross_validation(tmp_path, tiny_models, tiny_data, capsys):
    m = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="classification", kind="lora", arch="llama-random"
    )
    path = write_recipe(tmp_path / "r.yaml", **m)
    code, out = run_cli(capsys, "cv", str(path), "--folds", "2", "--set", "train.max_steps=2")
    assert code == 0 and out["folds"] == 2 and len(out["runs"]) == 2, out
    acc = out["summary"]["accuracy"]
    assert acc["n"] == 2 and acc["values"] == [r["metrics"]["accuracy"] for r in out["runs"]]
    assert abs(acc["mean"] - sum(acc["values"]) / 2) < 1e-12
    tests = []
    for r in out["runs"]:
        data = tmp_path / "runs" / r["run"].split("/")[-1] / "data"
        test = {_key(json.loads(x)) for x in (data / "test.jsonl").read_text().splitlines()}
        trained = {
            _key(json.loads(x))
            for s in ("train", "validation")
            for x in (data / f"{s}.jsonl").read_text().splitlines()
        }
        assert not test & trained
        tests.append(test)
    assert (
        not tests[0] & tests[1] and sum(r["test_examples"] for r in out["runs"]) == out["examples"]
    )
    assert (
        tmp_path / "runs" / "tiny-classification-lora-llama-random-cv" / "summary.json"
    ).is_file()


def test_seeds(tmp_path, tiny_models, tiny_data, capsys):
    m = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="classification", kind="lora", arch="llama-random"
    )
    m["merge"] = {"enabled": False}
    path = write_recipe(tmp_path / "r.yaml", **m)
    code, out = run_cli(capsys, "train", str(path), "--seeds", "2", "--set", "train.max_steps=2")
    assert code == 0 and out["seeds"] == [1, 2]
    for i, r in enumerate(out["runs"], 1):
        assert (
            r["run"].endswith(f"tiny-classification-lora-llama-random-seed{i}") and r["seed"] == i
        )
        run = json.loads(
            (
                tmp_path / "runs" / f"tiny-classification-lora-llama-random-seed{i}" / "run.json"
            ).read_text()
        )
        assert run["seed"] == i and run["status"] == "completed"
    acc = out["summary"]["accuracy"]
    values = [r["metrics"]["accuracy"] for r in out["runs"]]
    assert acc["n"] == 2 and acc["values"] == values
    assert acc["std"] == pytest.approx(
        statistics.stdev(values)
    )  # the sample spread of the two runs
    losses = [
        [
            row["loss"]
            for row in read_jsonl(
                tmp_path
                / "runs"
                / f"tiny-classification-lora-llama-random-seed{i}"
                / "metrics.jsonl"
            )
            if "loss" in row
        ]
        for i in (1, 2)
    ]
    assert losses[0] and losses[0] != losses[1]  # the seed changed the run, not just its name
