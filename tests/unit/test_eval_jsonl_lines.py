"""Prepared splits whose text holds Unicode line separators load back whole (the quickstart's
Rotten Tomatoes snippets do): JSON lines are split on "\\n" only."""

from __future__ import annotations

from ftcli.data.examples import PreparedData, load_prepared, save_prepared
from ftcli.util import read_jsonl, write_jsonl


def test_unicode_line_separators_survive(tmp_path):
    texts = ["one\u2028two", "three\x85four", "five\u2029six\x1cseven"]
    rows = [{"text": t, "label": "a" if i % 2 else "b"} for i, t in enumerate(texts)]
    save_prepared(
        PreparedData({"train": rows, "validation": [], "test": rows}, ["a", "b"], {}),
        tmp_path / "data",
    )
    assert load_prepared(tmp_path / "data").splits["test"] == rows
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows
