"""The Arrow reader of plain chat ranges (data/plain_chat.py) gives what the worker's Python loop
gives (examples._read_task without it): the same table, counts, hashes and first record, or
None, leaving the range to that loop."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftcli.data import examples as ex
from ftcli.data import plain_chat
from ftcli.data.rows import open_table
from tests.conftest import chat_recipe


def _both(path, recipe, tag=None, monkeypatch=None):
    """(what the Arrow reader gave or None, the worker's loop's result, the Arrow path's
    result) for the whole file as one range."""
    schema = ex.schema_of(recipe)
    if tag is not None:
        schema = schema.append(pa.field("source", pa.string()))
    raw = path.read_bytes()
    fast = plain_chat.read_range(raw, 0, recipe, schema, tag)
    task = (str(path), 0, len(raw), str(path.with_suffix(".arrow")))
    got = ex._read_task(task, recipe, tag, schema)
    got = got and (open_table(got[0]), *got[1:])
    monkeypatch.setattr(plain_chat, "read_range", lambda *a: None)
    want = ex._read_task(task, recipe, tag, schema)
    want = want and (open_table(want[0]), *want[1:])
    monkeypatch.undo()
    return fast, want, got


def _same(want, got):
    assert (want is None) == (got is None)
    if want is None:
        return
    (wt, *wrest), (gt, *grest) = want, got
    assert gt.schema.equals(wt.schema) and gt.equals(wt)
    assert grest[:2] == wrest[:2]  # records read, empties
    assert np.array_equal(grest[2], wrest[2])  # hashes
    assert grest[3:] == wrest[3:]  # labels (None), the first record


def test_whitespace_is_what_str_strip_removes():
    every = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert every == plain_chat.WHITESPACE


ODD = [" ", "\t", "\n", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u2028", "\u3000"]
# characters that are not whitespace but look or sit like it, and ones JSON escapes
LOOKALIKES = ["\u200b", "\ufeff", "\x00", "\x7f", '"', "\\", "/", "é", "😀", "a", "assistant"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["user", "assistant", "system", "Assistant", " assistant"]),
                st.lists(st.sampled_from(ODD + LOOKALIKES), max_size=6).map("".join),
            ),
            max_size=4,
        ),
        min_size=1,
        max_size=12,
    ),
    strip=st.booleans(),
    drop_empty=st.booleans(),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
)
def test_arrow_reads_plain_chat_as_the_loop_does(
    tmp_path, monkeypatch, rows, strip, drop_empty, ascii_only, crlf
):
    """Contents of every whitespace Python strips and of look-alikes it keeps, empty turns,
    conversations with no assistant or no messages, repeats, CRLF line ends: the same table,
    counts and hashes (dedupe and the splits rest on them) as the loop, and the Arrow reader
    took the range."""
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in rows]
    records += records[:2]  # repeats: equal hashes
    end = "\r\n" if crlf else "\n"
    path = tmp_path / "c.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + end for r in records)
    path.write_bytes(text.encode("utf-8"))
    recipe = chat_recipe(path, clean={"strip": strip, "drop_empty": drop_empty})
    fast, want, got = _both(path, recipe, monkeypatch=monkeypatch)
    if not any(rows):  # every list empty: Arrow finds no type for the messages
        assert fast is None
    else:
        assert fast is not None
    _same(want, got)


def test_a_source_tag_is_added_after_hashing(tmp_path, monkeypatch):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f" q{i} "},
                {"role": "assistant", "content": "a"},
            ]
        }
        for i in range(5)
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fast, want, got = _both(path, chat_recipe(path), tag="web", monkeypatch=monkeypatch)
    assert fast is not None and got[0].column("source").to_pylist() == ["web"] * 5
    _same(want, got)


def test_a_bom_at_the_start_is_read_as_the_text_stream_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode() * 3)
    fast, want, got = _both(path, chat_recipe(path), monkeypatch=monkeypatch)
    assert fast is not None
    _same(want, got)


GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
LEFT_TO_THE_LOOP = {
    "an extra message field": '{"messages": [{"role": "user", "content": "q", "name": "x"}, '
    '{"role": "assistant", "content": "a"}]}',
    "a number for content": '{"messages": [{"role": "user", "content": 7}, '
    '{"role": "assistant", "content": "a"}]}',
    "a null content": '{"messages": [{"role": "user", "content": null}, '
    '{"role": "assistant", "content": "a"}]}',
    "a missing content": '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
    "a null message": '{"messages": [null, {"role": "assistant", "content": "a"}]}',
    "no messages column": '{"chat": []}',
    "two objects on a line": GOOD + " " + GOOD,
    "a blank line": GOOD + "\n   ",
    "a lone CR": GOOD + "\r" + GOOD,
    "not an object": '"just text"',
    "messages as text": '{"messages": "hi"}',
}


@pytest.mark.parametrize("case", list(LEFT_TO_THE_LOOP))
def test_what_arrow_cannot_vouch_for_is_left_to_the_loop(tmp_path, monkeypatch, case):
    """Anything but plain {role, content} strings, one object a line: the Arrow reader gives
    None, and the worker's result is the loop's (an example, or None for the serial reader to
    name the record)."""
    path = tmp_path / "c.jsonl"
    path.write_text(GOOD + "\n" + LEFT_TO_THE_LOOP[case] + "\n" + GOOD + "\n")
    fast, want, got = _both(path, chat_recipe(path), monkeypatch=monkeypatch)
    assert fast is None
    _same(want, got)


def test_bytes_that_are_not_utf8_are_left_to_the_loop(tmp_path):
    """A latin-1 "é" inside a string, which Arrow's parser lets through: the serial reader
    detects the file's encoding instead."""
    path = tmp_path / "c.jsonl"
    bad = GOOD.replace('"q"', '"caf\u00e9"').encode("latin-1")
    assert b"caf\xe9" in bad
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n")
    recipe = chat_recipe(path)
    assert plain_chat.read_range(path.read_bytes(), 0, recipe, ex.schema_of(recipe), None) is None


def test_a_lone_surrogate_is_left_to_the_loop(tmp_path):
    """json.loads reads a lone surrogate escape; Arrow's parser refuses it."""
    path = tmp_path / "c.jsonl"
    bad = '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}'
    path.write_text(GOOD + "\n" + bad + "\n")
    recipe = chat_recipe(path)
    assert plain_chat.read_range(path.read_bytes(), 0, recipe, ex.schema_of(recipe), None) is None


@pytest.mark.parametrize(
    "data",
    [{"system_prompt": "Be brief."}, {"messages_column": None, "text_column": "text"}],
    ids=["system prompt", "text layout"],
)
def test_other_layouts_are_left_to_the_loop(tmp_path, data):
    path = tmp_path / "c.jsonl"
    path.write_text((GOOD[:-1] + ', "text": "t"}\n') * 3)
    recipe = chat_recipe(path, **data)
    assert plain_chat.read_range(path.read_bytes(), 0, recipe, ex.schema_of(recipe), None) is None


def test_reading_a_range_does_not_import_pandas(tmp_path):
    """Arrow's conversions from Python and numpy import pandas (half a second in each read
    worker); the reader moves its values through buffers instead."""
    import subprocess

    path = tmp_path / "c.jsonl"
    path.write_text((GOOD + "\n") * 20)
    code = (
        "import sys, pyarrow as pa\n"
        "from ftcli.data import examples as ex, plain_chat\n"
        "from tests.conftest import chat_recipe\n"
        f"r = chat_recipe({str(path)!r})\n"
        "schema = ex.schema_of(r).append(pa.field('source', pa.string()))\n"
        f"got = plain_chat.read_range(open({str(path)!r}, 'rb').read(), 0, r, schema, 'web')\n"
        "assert got is not None and got[1] == 20\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
