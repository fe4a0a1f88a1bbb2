"""A mixture trained end to end on tiny models: run.json and data.json count each source, and
``ftcli eval`` adds the metric per source on the sealed test split (classification and causal LM)."""

from __future__ import annotations

import csv
import json

from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import chat_rows, run_cli, sentiment_rows, tiny_recipe


def test_a_classification_mixture_reports_accuracy_per_source(
    tmp_path, tiny_models, tiny_data, capsys
):
    rows = sentiment_rows(240)
    a = tmp_path / "reviews.csv"
    with open(a, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "stars"])
        w.writeheader()
        w.writerows({"review": r["text"], "stars": r["label"]} for r in rows[:140])
    b = tmp_path / "tweets.jsonl"
    b.write_text("".join(json.dumps({"t": r["text"], "y": r["label"]}) + "\n" for r in rows[140:]))
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", arch="llama-random")
    m["name"] = "mix-cls"
    m["data"] = {
        "sources": [
            {"path": str(a), "text_column": "review", "label_column": "stars", "weight": 3},
            {"path": str(b), "text_column": "t", "label_column": "y", "weight": 1},
        ],
        "split": {"validation": 0.1, "test": 0.2, "seed": 0},
        "max_length": 32,
    }
    m["train"].update(max_steps=4)
    m["merge"] = {"enabled": False}
    r = recipe_from_mapping(m)
    train_run(r, UI())
    capsys.readouterr()  # the training's own output
    run = json.loads((r.run_dir / "run.json").read_text())
    per = run["data"]["sources"]
    assert set(per) == {"reviews", "tweets"}
    assert per["reviews"]["read"] == 140 and per["tweets"]["read"] == 100
    assert per["reviews"]["sizes"]["train"] == 3 * per["tweets"]["sizes"]["train"]
    test = [json.loads(x) for x in (r.run_dir / "data" / "test.jsonl").read_text().splitlines()]
    assert {e["source"] for e in test} == {"reviews", "tweets"}

    code, rep = run_cli(capsys, "eval", str(r.run_dir))
    assert code == 0
    by = rep["by_source"]
    assert set(by) == {"reviews", "tweets"}
    assert by["reviews"]["n"] == per["reviews"]["sizes"]["test"]
    assert by["tweets"]["n"] == per["tweets"]["sizes"]["test"]
    assert set(by["tweets"]) == {"n", "accuracy", "macro_f1"}
    # the per-source accuracies are the overall one, split: weighted by examples they agree
    overall = sum(v["accuracy"] * v["n"] for v in by.values()) / rep["n"]
    assert abs(overall - rep["metrics"]["accuracy"]) < 1e-9


def test_a_chat_and_instruction_mixture_reports_loss_per_source(
    tmp_path, tiny_models, tiny_data, capsys
):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(60)))
    inst = tmp_path / "alpaca.jsonl"
    inst.write_text(
        "".join(
            json.dumps({"instruction": f"Say the number {i}.", "output": f"{i}"}) + "\n"
            for i in range(60)
        )
    )
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", arch="llama")
    m["name"] = "mix-lm"
    m["data"] = {
        "sources": [
            {"path": str(chat), "messages_column": "messages"},
            {"path": str(inst), "instruction_column": "instruction", "output_column": "output"},
        ],
        "split": {"validation": 0.1, "test": 0.2, "seed": 0},
        "max_length": 64,
    }
    m["train"].update(max_steps=2)
    m["merge"] = {"enabled": False}
    r = recipe_from_mapping(m)
    train_run(r, UI())
    capsys.readouterr()  # the training's own output
    code, rep = run_cli(capsys, "eval", str(r.run_dir))
    assert code == 0
    by = rep["by_source"]
    assert set(by) == {"chat", "alpaca"}
    assert all({"completion_loss", "perplexity", "target_tokens"} <= set(v) for v in by.values())
    assert sum(v["target_tokens"] for v in by.values()) == rep["metrics"]["target_tokens"]
    assert by["chat"]["completion_loss"] != by["alpaca"]["completion_loss"]
