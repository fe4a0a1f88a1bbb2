"""`ftcli eval --baseline` end to end on tiny classifiers: a trained run improves on its start,
a run trained for 0 steps does not change, probes, run-vs-run, ensembles and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import FAST, run_cli, tiny_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tiny_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-cls")
    m = tiny_recipe(
        root, tiny_models, tiny_data, task="classification", kind="lora", arch="llama-random"
    )
    m["train"].update(epochs=3, optimizer={"name": "adamw", "lr": 1.0e-2})
    out = {}
    for name, train in (("trained", m["train"]), ("zero", {**m["train"], "max_steps": 0})):
        r = recipe_from_mapping({**m, "name": f"cls-{name}", "train": train})
        train_run(r, UI())
        out[name] = r.run_dir
    return out


def test_a_trained_run_improves_on_its_start(runs, capsys):
    code, rep = run_cli(capsys, "eval", str(runs["trained"]), "--baseline", *FAST)
    assert code == 0 and rep["ok"] and rep["baseline"]["kind"] == "base"
    acc = next(s for s in rep["significance"] if s["metric"] == "accuracy")
    assert rep["verdict"] == "improved" and acc["verdict"] == "improved"
    assert (
        acc["tuned"] >= 0.8
        and acc["ci_low"] > 0
        and acc["p_value"] < 0.05
        and acc["test"] == "McNemar exact"
    )
    assert "chance level" in rep["baseline"]["description"]
    assert {s["metric"] for s in rep["significance"]} == {
        "accuracy",
        "macro_f1",
        "calibration_error",
    }
    eval_dir = runs["trained"] / "eval"
    rows = [json.loads(x) for x in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == rep["test_examples"] == 48
    counts = rep["failures"]["counts"]
    assert counts["regression"] == acc["baseline_only"] and counts["fixed"] == acc["tuned_only"]
    assert sum(r["outcome"] == "regression" for r in rows) == counts["regression"]
    assert "improved" in (eval_dir / "report.md").read_text()
    assert all(s["ok"] for s in rep["stress"]), rep["stress"]
    assert [r["perturbation"] for r in rep["robustness"]["rows"]] == [
        "lowercase",
        "uppercase",
        "char_noise",
        "truncated",
        "appended_text",
    ]
    assert rep["overfitting"]["validation_points"] == 3


def test_a_run_trained_for_zero_steps_is_no_significant_change(runs, capsys):
    run = json.loads((runs["zero"] / "run.json").read_text())
    assert run["train"]["steps"] == 0 and (runs["zero"] / "init" / "head.safetensors").is_file()
    code, rep = run_cli(capsys, "eval", str(runs["zero"]), "--baseline", *FAST)
    assert code == 0 and rep["verdict"] == "no significant change"
    # why: LoRA's B starts at zero and the baseline carries the very head the run started from,
    # so the untrained model is the baseline; every difference is exactly zero
    for s in rep["significance"]:
        assert s["diff"] == 0 and s["ci_low"] == 0 and s["ci_high"] == 0 and s["p_value"] == 1.0, s
    rows = [
        json.loads(x)
        for x in (runs["zero"] / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(r["baseline"]["probs"] == r["tuned"]["probs"] for r in rows)
    assert rep["overfitting"]["status"] == "not enough points"


def test_probe_baseline(runs, capsys):
    code, rep = run_cli(
        capsys, "eval", str(runs["trained"]), "--baseline", "probe", "--no-robustness", *FAST
    )
    assert code == 0 and rep["baseline"]["kind"] == "probe"
    probe = rep["baseline"]["probe"]
    assert (
        len(probe["history"]) == probe["epochs"] and 1 <= probe["chosen_epoch"] <= probe["epochs"]
    )
    best = min(probe["history"], key=lambda h: h["val_loss"])
    assert probe["chosen_epoch"] == best["epoch"] and probe["train_examples"] == 168
    assert rep["verdict"] in ("improved", "no significant change", "regressed")
    assert rep["robustness"]["applies"] is False


def test_run_against_run_and_ensemble(runs, capsys, tmp_path):
    code, rep = run_cli(
        capsys,
        "eval",
        str(runs["trained"]),
        "--baseline",
        str(runs["zero"]),
        "--no-robustness",
        *FAST,
    )
    assert code == 0 and rep["baseline"]["kind"] == "run" and rep["verdict"] == "improved"
    pair = [
        json.loads(x)
        for x in (runs["trained"] / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    code, ens = run_cli(
        capsys,
        "eval",
        str(runs["trained"]),
        str(runs["zero"]),
        "--ensemble",
        "--out",
        str(tmp_path / "ens"),
        *FAST,
    )
    assert code == 0 and [m["name"] for m in ens["members"]] == ["cls-trained", "cls-zero"]
    assert ens["baseline"]["name"] == "cls-trained"  # the better member is the bar
    rows = [
        json.loads(x) for x in (tmp_path / "ens" / "predictions.jsonl").read_text().splitlines()
    ]
    for p, e in zip(
        pair, rows, strict=True
    ):  # the ensemble is the mean of the members' probabilities
        assert np.allclose(
            e["tuned"]["probs"],
            (np.array(p["tuned"]["probs"]) + p["baseline"]["probs"]) / 2,
            atol=2e-6,
        )
    members_acc = [m["metrics"]["accuracy"] for m in ens["members"]]
    assert members_acc[0] == pytest.approx(rep["metrics"]["tuned"]["accuracy"])
    assert members_acc[1] == pytest.approx(rep["metrics"]["baseline"]["accuracy"])


def test_plain_eval_and_bad_input(runs, capsys, tmp_path):
    code, rep = run_cli(capsys, "eval", str(runs["trained"]))
    assert code == 0 and "accuracy" in rep["metrics"]
    other = tmp_path / "other"
    shutil.copytree(runs["zero"], other)
    lines = (other / "data" / "test.jsonl").read_text().splitlines()
    (other / "data" / "test.jsonl").write_text("\n".join(lines[1:]) + "\n")
    code, err = run_cli(capsys, "eval", str(runs["trained"]), "--baseline", str(other))
    assert code == 1 and "not tested on the same examples" in err["error"]
    code, err = run_cli(capsys, "eval", str(runs["trained"]), str(runs["zero"]))
    assert code == 1 and "--ensemble" in err["error"]
    code, err = run_cli(capsys, "eval", str(tmp_path / "nowhere"), "--baseline")
    assert code == 1 and "not a run folder" in err["error"]
