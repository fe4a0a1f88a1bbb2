"""Using fine-tuned models: predict, chat, several adapters on one base, and user feedback that
trains the next run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ftcli.models
from ftcli.cli import app
from ftcli.merge import merge
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.serve.batch import predict, read_requests
from ftcli.serve.chat import chat_loop
from ftcli.serve.feedback import FeedbackLog
from ftcli.serve.predictor import load_predictor
from ftcli.ui import UI
from ftcli.util import read_jsonl
from tests.conftest import sentiment_rows, tiny_recipe, trained_run

TEXTS = [
    "the film was really good",
    "a dull and boring plot",
    "lovely acting and a superb story",
    "awful",
]


def test_predict_adapter_run_and_merged_folder_agree(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    unmerged = load_predictor(str(run))  # no merged/ in this run: base + adapter
    assert unmerged.adapters and unmerged.task == "classification"
    merge(run, tmp_path / "m")
    merged = load_predictor(str(tmp_path / "m"))
    assert not merged.adapters and merged.label_names == ["neg", "pos"]
    a, b = unmerged.classify(TEXTS), merged.classify(TEXTS)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert set(x["probs"]) == {"neg", "pos"} and sum(x["probs"].values()) == pytest.approx(1.0)
        assert x["probs"]["pos"] == pytest.approx(y["probs"]["pos"], abs=1e-5)


def test_predict_cli_file_in_file_out(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    src = tmp_path / "in.csv"
    src.write_text("review,id\n" + "".join(f"{t},{i}\n" for i, t in enumerate(TEXTS)))
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(run),
            "--input",
            str(src),
            "--text-column",
            "review",
            "--output",
            str(tmp_path / "p.csv"),
            "--batch-size",
            "3",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["count"] == 4
    import pandas as pd

    df = pd.read_csv(tmp_path / "p.csv")
    assert list(df["text"]) == TEXTS and set(df["label"]) <= {"neg", "pos"}
    assert ((df["prob_neg"] + df["prob_pos"]) - 1).abs().max() < 1e-6
    r = CliRunner().invoke(app, ["predict", str(run), "--input", str(src)])
    assert r.exit_code == 1 and "no 'text' column" in r.output and "--text-column" in r.output


def test_adapters_switch_per_request_without_reloading_the_base(
    tmp_path_factory, tiny_models, tiny_data, monkeypatch
):
    a = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    b = trained_run(
        tmp_path_factory, tiny_models, tiny_data, "classification", "lora", seed=1, lr=3.0e-2
    )
    loads = []
    real = ftcli.models.load_base_for
    monkeypatch.setattr(
        ftcli.models, "load_base_for", lambda *x, **k: loads.append(1) or real(*x, **k)
    )
    pred = load_predictor(None, [f"a={a}", f"b={b}"])
    assert loads == [1] and list(pred.adapters) == ["a", "b"]
    base_weight = pred.model.get_base_model().model.embed_tokens.weight
    ptr = base_weight.data_ptr()
    reqs = [{"text": t, "adapter": n} for t in TEXTS for n in ("a", "b")] + [{"text": TEXTS[0]}]
    rows = predict(pred, reqs)
    assert len(rows) == 2 * len(TEXTS) + 2  # the last request goes to both adapters
    assert loads == [1]  # switching never loads the base again ...
    assert (
        pred.model.get_base_model().model.embed_tokens.weight is base_weight
    )  # ... nor replaces it
    assert base_weight.data_ptr() == ptr
    # each adapter answers exactly as it does alone, and the two answer differently
    alone = {n: load_predictor(str(p)).classify(TEXTS) for n, p in (("a", a), ("b", b))}
    for r in rows[: 2 * len(TEXTS)]:
        ref = alone[r["adapter"]][TEXTS.index(r["text"])]
        assert r["probs"]["pos"] == pytest.approx(ref["probs"]["pos"], abs=1e-5)
    diffs = [
        abs(alone["a"][i]["probs"]["pos"] - alone["b"][i]["probs"]["pos"])
        for i in range(len(TEXTS))
    ]
    assert max(diffs) > 1e-3
    with pytest.raises(ftcli.errors.FtcliError, match="names adapter 'c', which is not loaded"):
        predict(pred, [{"text": "x", "adapter": "c"}])


def test_chat_scripted_feedback_and_switch(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    a = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    b = trained_run(
        tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora", seed=1, lr=3.0e-2
    )
    pred = load_predictor(None, [f"a={a}", f"b={b}"])
    fb = FeedbackLog(tmp_path / "feedback.jsonl", pred.source)
    script = (
        "what is 2 plus 3 ?\n/good\n"
        "what is 4 plus 4 ?\n/fix 4 plus 4 is 8 .\n/bad\n"
        "/switch nope\n/switch b\n/adapters\n"
        "what is 1 plus 1 ?\n/bad\n/frobnicate\n/quit\n"
    )
    out = io.StringIO()
    res = chat_loop(pred, io.StringIO(script), out, fb, system="You add numbers.", max_new_tokens=6)
    text = out.getvalue()
    assert (
        "already marked fixed" in text
        and "no adapter named 'nope'" in text
        and "unknown command /frobnicate" in text
    )
    assert "b (active)" in text
    assert [t["adapter"] for t in res["turns"]] == ["a", "a", "b"]
    assert res["feedback"] == {"good": 1, "fixed": 1, "bad": 1}
    good, fixed = read_jsonl(tmp_path / "feedback.jsonl")
    sys_msg = {"role": "system", "content": "You add numbers."}
    t = res["turns"]
    assert good["messages"] == [
        sys_msg,
        {"role": "user", "content": "what is 2 plus 3 ?"},
        {"role": "assistant", "content": t[0]["answer"]},
    ]
    assert good["feedback"] == "good" and good["adapter"] == "a"
    # the first answer was marked good, so the fixed row keeps the whole conversation
    assert fixed["messages"][1:] == [
        good["messages"][1],
        good["messages"][2],
        {"role": "user", "content": "what is 4 plus 4 ?"},
        {"role": "assistant", "content": "4 plus 4 is 8 ."},
    ]
    assert fixed["rejected"] == t[1]["answer"]
    (bad,) = read_jsonl(tmp_path / "feedback-rejected.jsonl")
    assert bad["feedback"] == "bad" and bad["adapter"] == "b" and bad["rejected"] == t[2]["answer"]
    assert bad["messages"][-1] == {"role": "user", "content": "what is 1 plus 1 ?"}
    # adapter b, switched to mid-conversation, answered as b does alone
    alone_b = load_predictor(str(b))
    convo = [
        sys_msg,
        good["messages"][1],
        good["messages"][2],
        fixed["messages"][3],
        fixed["messages"][4],
        {"role": "user", "content": "what is 1 plus 1 ?"},
    ]
    assert alone_b.generate([convo], max_new_tokens=6)[0] == t[2]["answer"]


def test_chat_refuses_a_classifier(tmp_path_factory, tiny_models, tiny_data):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    r = CliRunner().invoke(app, ["chat", str(run)], input="hi\n")
    assert r.exit_code == 1 and "chat is for causal language models" in r.output


def test_chat_in_a_real_terminal_process(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    merge(run, tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftcli",
            "chat",
            str(tmp_path / "m"),
            "--max-new-tokens",
            "4",
            "--feedback",
            str(tmp_path / "fb.jsonl"),
        ],
        input="what is 3 plus 3 ?\n/good\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "you> " in proc.stdout and "(marked good" in proc.stdout
    (row,) = read_jsonl(tmp_path / "fb.jsonl")
    assert row["messages"][0] == {"role": "user", "content": "what is 3 plus 3 ?"}


def _train_on(tmp_path, tiny_models, tiny_data, task: str, feedback: Path, **data_keys) -> dict:
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task=task, kind="lora", arch="llama")
    m["name"] = f"from-feedback-{task}"
    m["data"] = {
        "path": str(feedback),
        "split": {"validation": 0.1, "test": 0.2, "seed": 0},
        "max_length": 64,
        **data_keys,
    }
    m["train"]["max_steps"] = 2
    m["merge"] = {"enabled": False}
    return train_run(recipe_from_mapping(m), UI())


def test_classification_feedback_trains_the_next_run(
    tmp_path_factory, tiny_models, tiny_data, tmp_path
):
    """predict --review: good and fixed verdicts land in feedback.jsonl, which a recipe trains on
    as data.path; bad ones (no correction) go to the rejected file and are not trained on."""
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    rows = sentiment_rows(30, seed=7)
    src = tmp_path / "new.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    first = CliRunner().invoke(app, ["predict", str(run), "--input", str(src), "--json"])
    preds = json.loads(first.stdout)["predictions"]
    verdicts = []
    for i, (p, r) in enumerate(zip(preds, rows, strict=True)):
        if i % 10 == 9:
            verdicts.append("/bad")
        elif i % 10 == 8:
            verdicts.append("")  # skipped
        else:
            verdicts.append("/good" if p["label"] == r["label"] else f"/fix {r['label']}")
    verdicts.insert(0, "/fix maybe")  # not a label: refused, asked again
    fb = tmp_path / "feedback.jsonl"
    res = CliRunner().invoke(
        app,
        ["predict", str(run), "--input", str(src), "--review", "--feedback", str(fb), "--json"],
        input="\n".join(verdicts) + "\n",
    )
    assert res.exit_code == 0, res.output
    counts = json.loads(res.stdout)["feedback"]
    assert counts["bad"] == 3 and counts["good"] + counts["fixed"] == 24
    kept = read_jsonl(fb)
    assert len(kept) == 24 and all(k["label"] in ("neg", "pos") for k in kept)
    truth = {r["text"]: r["label"] for r in rows}
    assert all(
        k["label"] == truth[k["text"]] for k in kept
    )  # confirmed or corrected: the true label
    assert len(read_jsonl(tmp_path / "feedback-rejected.jsonl")) == 3
    out = _train_on(
        tmp_path,
        tiny_models,
        tiny_data,
        "classification",
        fb,
        text_column="text",
        label_column="label",
    )
    assert out["status"] == "completed" and out["data"]["read"] == 24


def test_chat_feedback_trains_the_next_run(tmp_path_factory, tiny_models, tiny_data, tmp_path):
    run = trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora")
    pred = load_predictor(str(run))
    fb = FeedbackLog(tmp_path / "feedback.jsonl", pred.source)
    lines = []
    for i in range(14):
        x, y = i % 7, (3 * i) % 10
        lines += [
            "/reset",
            f"what is {x} plus {y} ?",
            "/bad" if i % 7 == 6 else f"/fix {x} plus {y} is {x + y} .",
        ]
    chat_loop(pred, io.StringIO("\n".join(lines) + "\n"), io.StringIO(), fb, max_new_tokens=4)
    assert fb.counts == {"good": 0, "fixed": 12, "bad": 2}
    out = _train_on(
        tmp_path, tiny_models, tiny_data, "causal_lm", fb.path, messages_column="messages"
    )
    assert out["status"] == "completed" and out["data"]["read"] == 12


def test_read_requests_errors(tmp_path):
    with pytest.raises(ftcli.errors.FtcliError, match="nothing to predict"):
        read_requests(None, None)
    with pytest.raises(ftcli.errors.FtcliError, match="does not exist"):
        read_requests(None, str(tmp_path / "missing.jsonl"))


def test_a_prompt_longer_than_the_model_keeps_its_end(tiny_models):
    """GPT-2 has learned positions (128 here): a longer prompt must be cut, not crash the model."""
    pred = load_predictor(str(tiny_models["gpt2"]))
    long_prompt = " ".join(["word"] * 600) + " what is 2 plus 3 ?"
    out = pred.generate([[{"role": "user", "content": long_prompt}]], max_new_tokens=8, raw=True)
    assert len(out) == 1 and isinstance(out[0], str)
    assert (
        pred.tokenizer.truncation_side == "right" and pred.tokenizer.padding_side == "right"
    )  # restored
