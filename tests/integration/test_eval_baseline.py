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
    code, rep = run_cli(capsys, "eval", str(runs["trained"]), "--baseline", "base", *FAST)
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
    eval_dir = runs["trained"] / "eval" / "base"
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
    code, rep = run_cli(capsys, "eval", str(runs["zero"]), "--baseline", "base", *FAST)
    assert code == 0 and rep["verdict"] == "no significant change"
    # why: LoRA's B starts at zero and the baseline carries the very head the run started from,
    # so the untrained model is the baseline; every difference is exactly zero
    for s in rep["significance"]:
        assert s["diff"] == 0 and s["ci_low"] == 0 and s["ci_high"] == 0 and s["p_value"] == 1.0, s
    rows = [
        json.loads(x)
        for x in (runs["zero"] / "eval" / "base" / "predictions.jsonl").read_text().splitlines()
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
        for x in (runs["trained"] / "eval" / "vs-cls-zero" / "predictions.jsonl")
        .read_text()
        .splitlines()
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


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_tfidf_and_majority_in_one_report(runs, capsys):
    """Two classic baselines in one command: each its own paired comparison and folder, one index;
    the TF-IDF model is refitted here by hand (same split, same C grid) and must agree."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from ftcli.evaluation.classic import C_GRID
    from ftcli.rundir import open_run

    code, idx = run_cli(
        capsys,
        "eval",
        str(runs["trained"]),
        "--baseline",
        "tfidf",
        "--baseline",
        "majority",
        "--no-robustness",
        *FAST,
    )
    assert code == 0 and [c["baseline"]["kind"] for c in idx["comparisons"]] == [
        "tfidf",
        "majority",
    ]
    tfidf, majority = idx["comparisons"]
    rd = open_run(runs["trained"])
    labels = rd.prepared.labels
    train, val, test = (rd.prepared.splits[s] for s in ("train", "validation", "test"))
    y = lambda rows: [labels.index(r["label"]) for r in rows]  # noqa: E731
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    xtr = vec.fit_transform([r["text"] for r in train])
    val_acc = {
        c: LogisticRegression(C=c, max_iter=2000, random_state=0)
        .fit(xtr, y(train))
        .score(vec.transform([r["text"] for r in val]), y(val))
        for c in C_GRID
    }
    info = tfidf["baseline"]["tfidf"]
    assert info["validation_accuracy"] == pytest.approx(max(val_acc.values()))
    assert val_acc[info["C"]] == max(val_acc.values()) and info["train_examples"] == len(train)
    model = LogisticRegression(C=info["C"], max_iter=2000, random_state=0).fit(xtr, y(train))
    want = model.predict(vec.transform([r["text"] for r in test]))
    preds = _rows(runs["trained"] / "eval" / "tfidf" / "predictions.jsonl")
    assert [labels.index(r["baseline"]["pred"]) for r in preds] == want.tolist()
    acc = next(s for s in tfidf["significance"] if s["metric"] == "accuracy")
    assert acc["baseline"] == pytest.approx((want == np.array(y(test))).mean())
    assert acc["test"] == "McNemar exact"
    assert acc["baseline_only"] == sum(r["outcome"] == "regression" for r in preds)
    # majority: always the most frequent training label; its accuracy is the majority rate
    counts = {lab: sum(r["label"] == lab for r in train) for lab in labels}
    top = max(labels, key=lambda lab: counts[lab])
    assert majority["baseline"]["majority"]["label"] == top
    mrate = np.mean([r["label"] == top for r in test])
    macc = next(s for s in majority["significance"] if s["metric"] == "accuracy")
    assert macc["baseline"] == pytest.approx(mrate) == majority["majority"]["test_accuracy"]
    assert tfidf["majority"]["test_accuracy"] == pytest.approx(mrate)  # shown in every report
    assert "most frequent label" in majority["baseline"]["description"]
    assert "TF-IDF" in tfidf["baseline"]["description"]
    # one index: both comparisons side by side, each linking its own folder
    index = json.loads((runs["trained"] / "eval" / "index.json").read_text())
    shown = {r["folder"]: r for r in index["reports"]}
    assert {"tfidf", "majority"} <= set(shown)
    assert shown["tfidf"]["value_baseline"] == pytest.approx(acc["baseline"])
    html_index = (runs["trained"] / "eval" / "index.html").read_text()
    assert 'href="tfidf/report.html"' in html_index and 'href="majority/report.html"' in html_index
    assert "Majority rate" in (runs["trained"] / "eval" / "tfidf" / "report.md").read_text()


def test_a_second_eval_keeps_the_first_report(runs, capsys, tmp_path):
    out = tmp_path / "reports"
    code, first = run_cli(
        capsys, "eval", str(runs["trained"]), "--baseline", "base", "--out", str(out), *FAST
    )
    assert code == 0
    before = (out / "base" / "report.json").read_text()
    code, second = run_cli(
        capsys,
        "eval",
        str(runs["trained"]),
        "--baseline",
        "--no-robustness",
        "--out",
        str(out),
        *FAST,
    )
    # the bare flag on a classifier is the fair bar: the linear probe
    assert code == 0 and second["baseline"]["kind"] == "probe"
    assert (out / "base" / "report.json").read_text() == before
    assert (out / "probe" / "report.json").is_file()
    index = json.loads((out / "index.json").read_text())
    assert [r["folder"] for r in index["reports"]] == ["base", "probe"]
    assert index["reports"][0]["verdict"] == first["verdict"]
