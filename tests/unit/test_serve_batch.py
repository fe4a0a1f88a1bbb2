"""``ftcli predict``'s table and progress total (ftcli/serve/batch.py), without a model."""

from __future__ import annotations

from types import SimpleNamespace

from ftcli.serve.batch import progress_total, show_predictions
from ftcli.ui import UI


def test_the_table_shows_fifty_rows_and_says_how_many_more(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    pred = SimpleNamespace(task="classification", source="runs/q", adapters={})
    rows = [{"text": f"review {i}", "label": "pos", "score": 0.8125} for i in range(53)]
    show_predictions(UI(), pred, rows, None)
    out = capsys.readouterr().out
    assert "predictions (runs/q)" in out and "probability" in out and "0.812" in out
    assert "review 49" in out and "review 50" not in out
    assert "... 3 more (use --output FILE or --json for all)" in out
    show_predictions(UI(), pred, rows, "p.jsonl")
    assert "... 3 more\n" in capsys.readouterr().out  # written to a file: no hint


def test_generations_show_the_adapter_that_answered(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    pred = SimpleNamespace(task="causal_lm", source="base", adapters={"a": "runs/a", "b": "runs/b"})
    rows = [
        {"adapter": "a", "text": "hello", "generation": "hi there"},
        {"adapter": "b", "messages": [{"role": "user", "content": "bye"}], "generation": "ciao"},
    ]
    show_predictions(UI(), pred, rows, None)
    out = " ".join(capsys.readouterr().out.replace("│", " ").replace("┃", " ").split())
    assert "generations (base)" in out and "adapter prompt answer" in out
    assert "a hello hi there" in out and "b bye ciao" in out and "more" not in out


def test_the_progress_total_counts_each_answer():
    two = SimpleNamespace(adapters={"a": "x", "b": "y"})
    assert progress_total([{"text": "t"}] * 3, two) == 6  # every adapter answers each
    assert progress_total([{"text": "t", "adapter": "a"}] * 3, two) == 3  # each names its own
    assert progress_total([{"text": "t"}] * 3, SimpleNamespace(adapters={})) == 3
