"""``ftcli eval RUN --baseline`` for preference and reward runs (issue 23, item 4): the paired
figures on constructed cases whose answer is known, and the command on tiny trained runs, with a
reward judge and a classifier judge, and its bad input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ftcli.evaluation import stats
from ftcli.evaluation.preference import accuracy_headline, implicit_margins, win_rate
from tests.conftest import FAST, NEGATIVE, POSITIVE, run_cli, tiny_recipe, trained_run

# --------------------------------------------------------------------------- the figures


def test_mcnemar_figures_on_a_constructed_case():
    # 20 pairs: the start ranks 10 right; the tuned model keeps 9 of them, loses 1, gains 7
    start = np.array([1] * 10 + [0] * 10, bool)
    tuned = np.array([1] * 9 + [0] + [1] * 7 + [0] * 3, bool)
    row = stats.compare(accuracy_headline(start, tuned), 999, 0)
    assert row["baseline"] == 0.5 and row["tuned"] == 0.8
    assert row["diff"] == pytest.approx(0.3)
    assert (row["tuned_only"], row["baseline_only"]) == (7, 1)
    # exact two-sided binomial on 7 of 8 discordant pairs: 2 * (1 + 8) / 2**8
    assert row["p_value"] == pytest.approx(18 / 256)
    assert row["ci_low"] <= 0.3 <= row["ci_high"]
    assert row["verdict"] == stats.NO_CHANGE  # p = 0.07


def test_win_rate_and_sign_test_on_a_fixed_judge():
    start = [0.0] * 10
    tuned = [1.0] * 8 + [0.0] + [-1.0]  # 8 wins, 1 tie, 1 loss
    row = win_rate(start, tuned, 999, 0)
    assert (row["wins"], row["losses"], row["ties"]) == (8, 1, 1)
    assert row["tuned"] == pytest.approx(0.85)
    assert row["p_value"] == pytest.approx(20 / 512)  # 2 * (1 + 9) / 2**9
    assert row["ci_low"] > 0 and row["verdict"] == stats.IMPROVED


def test_a_start_against_itself_gives_no_difference():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=30), rng.normal(size=30)
    n = np.full(30, 5.0)
    m = implicit_margins("dpo", 0.1, c, r, n, n)
    row = stats.compare(accuracy_headline(m > 0, m > 0), 999, 0)
    assert row["diff"] == 0 and row["p_value"] == 1.0 and row["verdict"] == stats.NO_CHANGE
    w = win_rate(list(c), list(c), 999, 0)
    assert w["tuned"] == 0.5 and w["ties"] == 30 and w["p_value"] == 1.0
    assert w["verdict"] == stats.NO_CHANGE


def test_implicit_margins_follow_the_loss():
    c, r = np.array([-4.0]), np.array([-6.0])
    rc, rr = np.array([-5.0]), np.array([-5.0])
    cn, rn = np.array([2.0]), np.array([4.0])
    # DPO: beta * ((c - rc) - (r - rr)) = 0.5 * (1 - (-1))
    assert implicit_margins("dpo", 0.5, c, r, cn, rn, rc, rr)[0] == pytest.approx(1.0)
    # IPO: per-token log-ratios: 1/2 - (-1)/4
    assert implicit_margins("ipo", 0.5, c, r, cn, rn, rc, rr)[0] == pytest.approx(0.75)
    # SimPO: per-token log-probs, no reference: -4/2 - (-6/4)
    assert implicit_margins("simpo", 2.0, c, r, cn, rn)[0] == pytest.approx(-0.5)
    # the start model of a DPO run: its own summed log-probs
    assert implicit_margins("dpo", 0.5, c, r, cn, rn)[0] == pytest.approx(2.0)


# --------------------------------------------------------------------------- the command


def _pairs_file(path, n: int = 96, seed: int = 0):
    """Sentiment pairs: the film was -> a positive answer chosen, a negative one rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"the film number {i} was",
                "chosen": f" really {rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}",
                "rejected": f" really {rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_PAIR_RUNS: dict = {}


def _pair_run(tmp_path_factory, tiny_models, tiny_data, task: str, **pref):
    from ftcli.pipeline import train_run
    from ftcli.recipe import recipe_from_mapping
    from ftcli.ui import UI

    key = (task, tuple(sorted(pref.items())))
    if key not in _PAIR_RUNS:
        root = tmp_path_factory.mktemp(f"pair-{task}")
        m = tiny_recipe(root, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama")
        m["task"] = task
        m["name"] = f"{task}-{pref.get('loss', 'bt')}"
        m["data"] = {
            "path": str(_pairs_file(root / "pairs.jsonl")),
            "split": {"validation": 0.1, "test": 0.25, "seed": 0},
            "max_length": 32,
        }
        m["train"].update(max_steps=8, batch_size=8, optimizer={"name": "adamw", "lr": 2e-2})
        m["merge"] = {"enabled": False}
        m["eval"] = {"batch_size": 16, "max_new_tokens": 6, "generate_examples": 8}
        if pref:
            m["preference"] = pref
        r = recipe_from_mapping(m)
        train_run(r, UI())
        _PAIR_RUNS[key] = r.run_dir
    return _PAIR_RUNS[key]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_models, tiny_data):
    return _pair_run(tmp_path_factory, tiny_models, tiny_data, "preference", loss="dpo", beta=0.5)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_models, tiny_data):
    return _pair_run(tmp_path_factory, tiny_models, tiny_data, "reward")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_models, tiny_data):
    return trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_models, tiny_data):
    return trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")


def test_preference_run_vs_its_start_with_a_reward_judge(capsys, dpo_run, reward_run, tmp_path):
    code, rep = run_cli(
        capsys, "eval", str(dpo_run), "--baseline", "--judge", str(reward_run),
        "--out", str(tmp_path / "e"), *FAST,
    )  # fmt: skip
    assert code == 0, rep
    assert rep["task"] == "preference" and rep["primary_metric"] == "preference_accuracy"
    top = rep["significance"][0]
    assert top["metric"] == "preference_accuracy" and top["test"] == "McNemar exact"
    assert top["n"] == rep["examples_scored"] > 0
    g = rep["generation"]
    assert g["judge_task"] == "reward" and g["prompts"] == 8
    w = g["win_rate"]
    assert w["wins"] + w["losses"] + w["ties"] == 8 and w["test"] == "sign test (exact)"
    assert g["kl"]["kl_per_token"] >= 0 and g["kl"]["tokens"] > 0
    metrics = [s["metric"] for s in rep["significance"]]
    assert metrics == ["preference_accuracy", "win_rate", "judge_score"]
    files = rep["files"]
    md = Path(files["markdown"]).read_text()
    assert "Generated answers, judged" in md and "Win rate" in md
    assert "Generated answers, judged" in Path(files["html"]).read_text()
    first = json.loads(Path(files["predictions"]).read_text().splitlines()[0])
    assert {"chosen", "rejected", "baseline", "tuned", "generated"} <= set(first)


def test_preference_run_with_a_classifier_judge(capsys, dpo_run, cls_run, tmp_path):
    cls = cls_run
    code, rep = run_cli(
        capsys, "eval", str(dpo_run), "--baseline", "--judge", str(cls), "--judge-label", "pos",
        "--prompts", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "e"), *FAST,
    )  # fmt: skip
    assert code == 0, rep
    g = rep["generation"]
    assert g["judge_task"] == "classification" and g["judge_label"] == "pos"
    assert g["prompts"] == 4 and g["max_new_tokens"] == 3
    rows = {s["metric"]: s for s in rep["significance"]}
    assert rows["judge_positive_rate"]["test"] == "McNemar exact"
    assert 0 <= rows["judge_score"]["tuned"] <= 1


def test_reward_run_vs_its_untrained_head(capsys, reward_run, tmp_path):
    code, rep = run_cli(
        capsys, "eval", str(reward_run), "--baseline", "--out", str(tmp_path), *FAST
    )
    assert code == 0, rep
    assert rep["task"] == "reward" and "init/head.safetensors" in rep["baseline"]["description"]
    top = rep["significance"][0]
    assert top["metric"] == "preference_accuracy" and top["test"] == "McNemar exact"
    # the pairs are separable by the sentiment word: the trained head ranks most of them right
    assert rep["metrics"]["tuned"]["preference_accuracy"] > 0.8


def test_bad_judges_are_one_clear_error(capsys, dpo_run, reward_run, cls_run, lm_run):
    lm, cls = lm_run, cls_run
    code, out = run_cli(capsys, "eval", str(dpo_run), "--baseline", "--judge", str(lm))
    assert code == 1 and "a judge is a task reward run or a classification run" in out["error"]
    code, out = run_cli(capsys, "eval", str(dpo_run), "--baseline", "--judge", str(cls))
    assert code == 1 and "--judge-label names none" in out["error"]
    code, out = run_cli(
        capsys, "eval", str(dpo_run), "--baseline", "--judge", str(cls), "--judge-label", "nope"
    )
    assert code == 1 and "'nope', not one of them" in out["error"]
    code, out = run_cli(capsys, "eval", str(dpo_run), "--judge", str(reward_run))
    assert code == 1 and "applies with --baseline" in out["error"]
    code, out = run_cli(capsys, "eval", str(lm), "--baseline", "--judge", str(reward_run))
    assert code == 1 and "applies to task preference runs" in out["error"]
