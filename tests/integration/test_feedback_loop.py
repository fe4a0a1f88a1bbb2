"""The feedback loop end to end on tiny models: a scripted chat with /fix, /good and /bad on an
SFT run -> ``ftcli feedback export`` -> a DPO run started from that SFT run -> ``ftcli eval
--baseline`` (tuned vs its start on the held-out pairs)."""

from __future__ import annotations

import io
import json

from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.serve.chat import chat_loop
from ftcli.serve.feedback import FeedbackLog
from ftcli.serve.predictor import load_predictor
from ftcli.ui import UI
from ftcli.util import read_jsonl
from tests.conftest import FAST, run_cli, tiny_recipe, trained_run


def test_chat_feedback_export_dpo_and_eval_baseline(
    tmp_path_factory, tmp_path, tiny_models, tiny_data, capsys
):
    sft = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "full")
    pred = load_predictor(str(sft))
    lines = []
    for a in range(8):
        for b in (1, 2, 3):
            lines += [f"what is {a} plus {b} ?", f"/fix {a} plus {b} is {a + b} .", "/reset"]
    lines += ["what is 9 plus 9 ?", "/good", "/reset", "what is 9 plus 8 ?", "/bad", "/quit"]
    feedback = tmp_path / "chat" / "feedback.jsonl"
    log = FeedbackLog(feedback, pred.source)
    chat_loop(pred, io.StringIO("\n".join(lines) + "\n"), io.StringIO(), log, max_new_tokens=3)
    assert log.counts == {"good": 1, "fixed": 24, "bad": 1}

    capsys.readouterr()  # what the chat printed beside its answers
    pairs = tmp_path / "pairs.jsonl"
    rc, out = run_cli(capsys, "feedback", "export", str(feedback), "--out", str(pairs))
    assert rc == 0, out
    rows = list(read_jsonl(pairs))
    fixes = [r for r in rows if "chosen" in r]
    votes = [r for r in rows if "completion" in r]
    assert len(votes) == 2  # /good and /bad: KTO rows, written as they are
    assert len(fixes) >= 20  # a fix equal to the model's own answer would be no pair
    assert all(f["chosen"] != f["rejected"] for f in fixes)

    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", kind="lora", arch="llama")
    m.update(task="preference", name="feedback-dpo", model={"name": str(sft)})
    m["data"] = {
        "path": str(pairs),
        "max_length": 64,
        "split": {"validation": 0.0, "test": 0.25, "seed": 0},
    }
    m["preference"] = {"loss": "dpo", "beta": 0.1}
    m["train"].update(epochs=2, batch_size=4, optimizer={"name": "adamw", "lr": 1e-2})
    m["merge"] = {"enabled": False}
    recipe = recipe_from_mapping(m)
    done = train_run(recipe, UI())
    assert done["status"] == "completed"
    # the unpaired /good and /bad rows cannot feed a pair loss: counted and dropped, not trained
    stats = json.loads((recipe.run_dir / "data" / "data.json").read_text())
    assert stats["dropped"]["unpaired"] == 2, stats["dropped"]

    capsys.readouterr()  # the training run's own output
    rc, rep = run_cli(capsys, "eval", str(recipe.run_dir), "--baseline", *FAST)
    assert rc == 0, rep
    assert rep["task"] == "preference" and rep["primary_metric"] == "preference_accuracy"
    assert rep["examples_scored"] > 0
