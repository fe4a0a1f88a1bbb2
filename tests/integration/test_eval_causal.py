"""`ftcli eval --baseline` on a tiny chat model: loss, generated answers, failures, stress, ensembles."""

from __future__ import annotations

import json
import math

import pytest

from ftcli.evaluation.ensemble import ensemble_loss_sums
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import FAST, run_cli, tiny_recipe


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, tiny_models, tiny_data):
    root = tmp_path_factory.mktemp("eval-lm")
    m = tiny_recipe(root, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama")
    m["eval"] = {"batch_size": 32, "generate_examples": 8, "max_new_tokens": 8}
    m["merge"] = {"enabled": False}
    out = {}
    for name, train in (("trained", m["train"]), ("zero", {**m["train"], "max_steps": 0})):
        r = recipe_from_mapping({**m, "name": f"lm-{name}", "train": train})
        train_run(r, UI())
        out[name] = r.run_dir
    return out


def test_chat_model_against_its_base(lm_runs, capsys):
    code, rep = run_cli(capsys, "eval", str(lm_runs["trained"]), "--baseline", *FAST)
    assert code == 0 and rep["primary_metric"] == "completion_loss"
    loss = next(s for s in rep["significance"] if s["metric"] == "completion_loss")
    assert (
        loss["tuned"] < loss["baseline"] and loss["verdict"] == "improved" and loss["ci_high"] < 0
    )
    names = {s["metric"] for s in rep["significance"]}
    assert {
        "exact_match",
        "token_f1",
        "rouge_l",
        "stop_rate",
        "answer_tokens",
        "perplexity",
    } <= names
    tuned = rep["metrics"]["tuned"]
    assert tuned["generated"] == 8 and 0 < tuned["answer_tokens"] <= 8
    rows = [
        json.loads(x)
        for x in (lm_runs["trained"] / "eval" / "base" / "predictions.jsonl")
        .read_text()
        .splitlines()
    ]
    assert all("answer" in r["tuned"] for r in rows[:8]) and all(
        "answer" not in r["tuned"] for r in rows[8:]
    )
    assert rows[0]["reference"].endswith(".") and "plus" in rows[0]["prompt"]
    assert all(s["ok"] for s in rep["stress"]), rep["stress"]
    assert {r["perturbation"] for r in rep["robustness"]["rows"]} >= {"char_noise", "appended_text"}


def test_zero_steps_chat_model_is_unchanged(lm_runs, capsys):
    code, rep = run_cli(
        capsys, "eval", str(lm_runs["zero"]), "--baseline", "--no-robustness", *FAST
    )
    assert code == 0 and rep["verdict"] == "no significant change"
    for s in rep["significance"]:
        assert s["diff"] == 0 and s["p_value"] == 1.0, s


def test_chat_ensemble_and_probe_refused(lm_runs, capsys, tmp_path):
    code, ens = run_cli(
        capsys,
        "eval",
        str(lm_runs["trained"]),
        str(lm_runs["zero"]),
        "--ensemble",
        "--out",
        str(tmp_path / "ens"),
        *FAST,
    )
    assert code == 0 and ens["metrics"]["tuned"]["completion_loss"] > 0
    member_losses = [m["metrics"]["completion_loss"] for m in ens["members"]]
    # averaging probabilities: the ensemble's loss is at most the members' mean loss (Jensen), not one member's
    assert (
        ens["metrics"]["tuned"]["completion_loss"] <= sum(member_losses) / len(member_losses) + 1e-9
    )
    assert ens["metrics"]["tuned"]["completion_loss"] not in member_losses
    code, err = run_cli(capsys, "eval", str(lm_runs["trained"]), "--baseline", "probe")
    assert code == 1 and "classification runs only" in err["error"]


def test_ensemble_loss_by_hand():
    # two members, one example of two tokens: p = (0.5, 0.25) and (0.25, 0.25)
    members = [[[math.log(0.5), math.log(0.25)]], [[math.log(0.25), math.log(0.25)]]]
    assert ensemble_loss_sums(members) == pytest.approx([-(math.log(0.375) + math.log(0.25))])


def test_run_json_scores_what_ftcli_eval_scores_after_bf16_training(
    tmp_path, tiny_models, tiny_data, capsys
):
    """The test metrics a run writes are those `ftcli eval` recomputes from its folder: training's
    bf16 autocast (accelerate wraps the model's forward in it) must not leak into the evaluation."""
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama")
    m["train"].update(mixed_precision="bf16", max_steps=2)
    m["eval"] = {"batch_size": 32, "generate_examples": 0}
    m["merge"] = {"enabled": False}
    r = recipe_from_mapping(m)
    train_run(r, UI())
    written = json.loads((r.run_dir / "run.json").read_text())["eval"]["metrics"]
    capsys.readouterr()  # the training's own output
    code, rep = run_cli(capsys, "eval", str(r.run_dir), "--baseline", "--no-robustness", *FAST)
    assert code == 0
    assert rep["metrics"]["tuned"]["completion_loss"] == pytest.approx(
        written["completion_loss"], abs=1e-6
    )
