"""Arrow underneath the data stage: prepare() and tokenize() give exactly what the list-based
implementation gave (kept in tests/unit/legacy_data.py), split for split and token for token, on
every layout; the features are a memory-mapped sequence with lengths; write_data/read_data round
trip; run folders of the old layout (train.jsonl) and the new one (train.arrow) open."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftcli.data import examples as ex
from ftcli.data import pool
from ftcli.data import tokenize as tk
from ftcli.data.prepared import read_data, write_data
from ftcli.data.rows import Features, Rows
from ftcli.errors import DataError, FtcliError
from ftcli.recipe import recipe_from_mapping
from tests.conftest import _train_tokenizer, chat_rows, sentiment_rows
from tests.unit import legacy_data as old


def _recipe(path, task="classification", **data):
    m = {
        "name": "t",
        "task": task,
        "model": {"name": "m"},
        "data": {"path": str(path), **data},
        "method": {"kind": "full"},
    }
    return recipe_from_mapping(m)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _noisy_sentiment(n, seed=0):
    """Sentiment rows with duplicates, blanks, padding spaces and an odd third label."""
    rng = random.Random(seed)
    rows = sentiment_rows(n, seed)
    rows += [dict(r) for r in rng.sample(rows, n // 10)]  # duplicates
    rows += [{"text": "  ", "label": "pos"}, {"text": f"  {rows[3]['text']}  ", "label": "neg"}]
    rows += [{"text": f"meh {i}", "label": "meh"} for i in range(12)]
    rng.shuffle(rows)
    return rows


def _chat(n, seed=0):
    rows = chat_rows(n, seed)
    for i, r in enumerate(rows):  # some longer conversations, some repeated
        if i % 3 == 0:
            r["messages"] = r["messages"] + [
                {"role": "user", "content": " and then ? "},
                {"role": "assistant", "content": "nothing more ."},
            ]
    return rows + rows[:7]


def _layouts(tmp_path):
    """(name, recipe) for every layout and the split options that change the split logic."""
    cls_rows = _noisy_sentiment(300)
    p = _jsonl(tmp_path / "cls.jsonl", cls_rows)
    val = _jsonl(tmp_path / "val.jsonl", cls_rows[:40] + sentiment_rows(30, seed=5))
    test = _jsonl(tmp_path / "test.jsonl", cls_rows[20:60] + sentiment_rows(30, seed=6))
    pq.write_table(pa.Table.from_pylist(cls_rows), tmp_path / "cls.parquet")
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in cls_rows))
    folder = tmp_path / "folder"
    for i, r in enumerate(cls_rows[:80]):
        (folder / r["label"]).mkdir(parents=True, exist_ok=True)
        (folder / r["label"] / f"{i:03d}.txt").write_text(r["text"])
    text = _jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in cls_rows])
    comp = _jsonl(
        tmp_path / "comp.jsonl",
        [{"q": f"say {r['text']}", "a": f" {r['label']}"} for r in cls_rows],
    )
    inst = _jsonl(
        tmp_path / "inst.jsonl",
        [
            {"ins": "label it", "inp": r["text"] if i % 2 else "", "out": r["label"]}
            for i, r in enumerate(cls_rows)
        ],
    )
    chat = _jsonl(tmp_path / "chat.jsonl", _chat(200))
    lm = "causal_lm"
    return [
        ("cls-jsonl", _recipe(p)),
        ("cls-no-stratify", _recipe(p, split={"stratify": False, "seed": 3})),
        ("cls-parquet", _recipe(tmp_path / "cls.parquet")),
        ("cls-csv", _recipe(csv)),
        ("cls-folder", _recipe(folder)),
        ("cls-labels", _recipe(p, labels=["pos", "neg"])),
        ("cls-explicit", _recipe(p, validation_path=str(val), test_path=str(test))),
        ("cls-explicit-test", _recipe(p, test_path=str(test), split={"validation": 0.2})),
        (
            "cls-caps",
            _recipe(p, max_train_examples=50, max_validation_examples=7, max_test_examples=9),
        ),
        ("cls-caps-lose-a-label", _recipe(p, max_train_examples=3)),
        ("cls-missing-label", _recipe(p, labels=["pos", "nope"])),
        ("cls-raw", _recipe(p, clean={"strip": False, "drop_empty": False, "dedupe": False})),
        ("cls-no-dedupe", _recipe(p, clean={"dedupe": False}, test_path=str(test))),
        ("text", _recipe(text, lm)),
        ("completion", _recipe(comp, lm, prompt_column="q", completion_column="a")),
        (
            "instruction",
            _recipe(
                inst,
                lm,
                instruction_column="ins",
                input_column="inp",
                output_column="out",
                system_prompt="be brief",
            ),
        ),
        ("chat", _recipe(chat, lm, messages_column="messages")),
        ("chat-system", _recipe(chat, lm, messages_column="messages", system_prompt="hi")),
    ]


def _like_legacy(name: str, recipe) -> None:
    """``prepare`` gives the list-based splits, labels and stats (as data.json writes them: same
    values, same key order), or the same error word for word."""
    try:
        want = old.prepare(recipe)
    except FtcliError as exc:
        with pytest.raises(type(exc)) as new:
            ex.prepare(recipe)
        assert str(new.value) == str(exc), name
        return
    got = ex.prepare(recipe)
    for s in ex.SPLITS:
        assert isinstance(got.splits[s], Rows), name
        assert list(got.splits[s]) == want.splits[s], f"{name}: {s} differs"
    assert got.labels == want.labels, name
    assert json.dumps(got.stats) == json.dumps(want.stats), name


def test_prepare_gives_exactly_the_list_based_splits_on_every_layout(tmp_path):
    for name, recipe in _layouts(tmp_path):
        _like_legacy(name, recipe)


def test_unstratified_split_is_train_test_splits_own_draw_without_sklearn():
    """The unstratified split skips importing sklearn (seconds) but draws exactly as it does."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    for n, seed, frac in [(2, 0, 0.5), (10, 1, 0.1), (97, 42, 0.3), (20_011, 7, 0.01)]:
        idx = np.arange(n) * 3 + 1
        got = ex._split_off(idx, None, frac, seed, True, "test", frac)
        want = train_test_split(idx, test_size=max(1, round(n * frac)), random_state=seed)
        assert [a.tolist() for a in got] == [b.tolist() for b in want], (n, seed, frac)
    code = "import sys, numpy as np; from ftcli.data import examples as ex; "
    code += "ex._split_off(np.arange(50), None, 0.2, 0, True, 't', 0.2); "
    code += "print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rows_are_written_as_from_pylist_writes_them(tmp_path):
    """TableWriter builds a messages column from one list per field (fast); the same table as
    Arrow's own per-row conversion, nulls for the fields a message lacks included."""
    from ftcli.data.rows import TableWriter, open_table

    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": []},
        {
            "messages": [
                {"role": "user", "content": "é ✓"},
                {"role": "assistant", "content": "ok", "reasoning_content": "because"},
                {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"},
            ]
        },
    ]
    schema = ex.schema_of(_recipe(tmp_path / "x.jsonl", task="causal_lm", messages_column="m"))
    with TableWriter(tmp_path / "t.arrow", schema) as w:
        w.rows(rows)
    assert open_table(tmp_path / "t.arrow").equals(pa.Table.from_pylist(rows, schema=schema))


def test_prepare_streams_big_jsonl_in_chunks_with_the_same_splits(tmp_path, monkeypatch):
    from ftcli.data import read

    monkeypatch.setattr(read, "CHUNK", 37)  # many chunks, one boundary inside each check
    rows = _noisy_sentiment(400, seed=2)
    p = _jsonl(tmp_path / "big.jsonl", rows)
    recipe = _recipe(p)
    got, want = ex.prepare(recipe), old.prepare(recipe)
    assert all(list(got.splits[s]) == want.splits[s] for s in ex.SPLITS)
    assert got.stats == want.stats


def test_a_bad_chat_record_is_numbered_across_chunks(tmp_path, monkeypatch):
    from ftcli.data import read

    monkeypatch.setattr(read, "CHUNK", 10)
    rows = chat_rows(30)
    rows[24] = {"messages": "not a list"}
    recipe = _recipe(_jsonl(tmp_path / "c.jsonl", rows), "causal_lm", messages_column="messages")
    with pytest.raises(DataError, match="record 25:"):
        ex.prepare(recipe)


def _parallel_reads(monkeypatch, read_bytes: int) -> list:
    """Every jsonl source read by worker processes, ``read_bytes`` a task (tiny: many ranges);
    returns the list each parallel read appends its outcome to (True: the workers read it;
    False: they gave up to the serial reader; "raised"), so a test knows which reader read."""
    monkeypatch.setattr(ex, "PARALLEL_READ_FROM", 0)
    monkeypatch.setattr(ex, "READ_BYTES", read_bytes)
    monkeypatch.setattr(pool, "num_procs", lambda recipe: 2)
    done: list = []
    real = ex._read_parallel

    def spy(*a, **k):
        try:
            got = real(*a, **k)
        except Exception:
            done.append("raised")
            raise
        done.append(got is not None)
        return got

    monkeypatch.setattr(ex, "_read_parallel", spy)
    return done


def test_parallel_reading_gives_exactly_the_list_based_splits(tmp_path, monkeypatch):
    """Worker processes read byte ranges of a big jsonl file; the splits, labels and stats are
    word for word those of the one-process reader, on every jsonl layout."""
    done = _parallel_reads(monkeypatch, 700)
    cases = [(n, r) for n, r in _layouts(tmp_path) if str(r.data.path).endswith(".jsonl")]
    assert len(cases) >= 10
    for name, recipe in cases:
        done.clear()
        _like_legacy(name, recipe)
        assert done and all(x is True for x in done), name  # the workers read it: no fallback


def test_a_read_started_ahead_that_nobody_takes_is_stopped_and_removed(tmp_path, monkeypatch):
    import multiprocessing

    _parallel_reads(monkeypatch, 700)
    rows = chat_rows(200)
    recipe = _recipe(_jsonl(tmp_path / "c.jsonl", rows), "causal_lm", messages_column="messages")
    with ex.read_ahead(recipe, tmp_path):
        assert len(ex._AHEAD) == 1 and multiprocessing.active_children()
        assert [p.name[:11] for p in tmp_path.iterdir() if p.is_dir()] == [".ftcli-read"]
    assert not ex._AHEAD and not multiprocessing.active_children()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_reading_reads_lines_as_the_text_stream_does(tmp_path, monkeypatch, start):
    """A BOM, CRLF and lone CR line ends, blank lines, a bare string as a record, multi-byte
    characters and U+2028 inside strings, across many range cuts: the same examples, from
    forked workers (Linux) and spawned ones (elsewhere: the recipe and schema pickled)."""
    monkeypatch.setattr(pool, "START_METHOD", start)
    rows = [
        json.dumps(
            {"text": f"línea {i} ✓ \u2028 {'x' * (i % 50)}", "label": "ab"[i % 2]},
            ensure_ascii=False,  # the characters themselves in the file, not escapes
        )
        for i in range(300)
    ]
    body = "".join(
        r + ("\r\n" if i % 3 == 0 else "\r" if i % 7 == 0 else "\n") + ("\n  \n" * (i % 11 == 0))
        for i, r in enumerate(rows)
    )
    body += json.dumps("a bare string") + "\n"
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    recipe = _recipe(path, "causal_lm")
    serial = ex.prepare(recipe)
    done = _parallel_reads(monkeypatch, 301)
    got = ex.prepare(recipe)
    assert done == [True]
    assert got.stats == serial.stats and got.stats["read"] == 301
    for s in ex.SPLITS:
        assert list(got.splits[s]) == list(serial.splits[s])


def test_parallel_reading_fails_as_the_serial_reader_does(tmp_path, monkeypatch):
    """A bad record, a line that is not JSON, bytes that are not utf-8, a lone surrogate escape
    (a DataError naming the record, not an encoding error from Arrow), a missing column, an
    empty file: the workers give up and the one-process reader says what and where, word for
    word as without workers."""
    rows = chat_rows(300)
    bad_record = [dict(r) for r in rows]
    bad_record[250] = {"messages": "not a list"}
    lone = [dict(r) for r in rows]
    lone[250] = {"messages": [{"role": "user", "content": "a\ud800"}, *rows[250]["messages"][1:]]}
    cases = {
        "record": _jsonl(tmp_path / "record.jsonl", bad_record),
        "surrogate": _jsonl(tmp_path / "surrogate.jsonl", lone),
        "json": tmp_path / "json.jsonl",
        "columns": _jsonl(tmp_path / "columns.jsonl", [{"chat": r["messages"]} for r in rows]),
        "empty": tmp_path / "empty.jsonl",
        "latin": tmp_path / "latin.jsonl",
    }
    lines = [json.dumps(r) for r in rows]
    cases["json"].write_text("\n".join(lines[:200] + ["{oops"] + lines[200:]) + "\n")
    cases["empty"].write_text("\n\n")
    latin = [json.dumps(r, ensure_ascii=False) for r in chat_rows(300, seed=3)]
    latin[280] = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "café"},
                {"role": "assistant", "content": "oui"},
            ]
        },
        ensure_ascii=False,
    )
    cases["latin"].write_bytes("\n".join(latin).encode("latin-1"))

    def outcome(recipe):
        try:
            p = ex.prepare(recipe)
        except Exception as exc:  # noqa: BLE001 (compared, type and words)
            return type(exc).__name__, str(exc)
        return "ok", p.stats

    for name, path in cases.items():
        recipe = _recipe(path, "causal_lm", messages_column="messages")
        with monkeypatch.context() as m:
            want = outcome(recipe)
            done = _parallel_reads(m, 1000)
            got = outcome(recipe)
        assert got == want, name
        # the workers gave up and the serial reader spoke, or (no records at all) the parallel
        # reader raised the serial reader's own error
        assert done == (["raised"] if name == "empty" else [False]), name
        assert name == "latin" or want[0] != "ok", name
        if name in ("record", "surrogate"):
            assert got[0] == "DataError" and "record 251" in got[1], got


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("a<e> \n\t\x1c\u2003\u00a0"), max_size=12),
    tail=st.sampled_from(["<e>", "e>", "e", "", " "]),
)
def test_ends_with_is_rstrip_endswith(text, tail):
    """The EOS check's copy-free form answers as ``text.rstrip().endswith(tail)`` on every
    whitespace Python strips (including the ones outside ASCII)."""
    assert tk.ends_with(text, tail) == text.rstrip().endswith(tail)


def test_example_hash_bytes_are_equal_exactly_when_the_examples_are():
    """The length-prefixed form dedupe hashes stands for the example's canonical JSON: equal
    bytes for equal examples (whatever the key order), different for different ones, including
    contents built to run into the separators."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    # contents made of the separators, the lengths and the key names: where collisions live
    bits = ["a", ":", "1", "4", "5:", "s", "m", "text", "label", "role", "user", "\x00", "{"]
    text = st.lists(st.sampled_from(bits), max_size=5).map("".join)
    message = st.fixed_dictionaries({"role": text, "content": text})
    rich = st.fixed_dictionaries({"role": text, "content": text, "name": text})
    example = st.one_of(
        st.dictionaries(st.sampled_from(["text", "label", "prompt", "completion"]), text),
        st.fixed_dictionaries({"messages": st.lists(st.one_of(message, rich), max_size=3)}),
    )

    @settings(max_examples=3000, deadline=None)
    @given(example, example)
    def check(a, b):
        same = ex._key(a) == ex._key(b)
        assert (ex._key_bytes(a) == ex._key_bytes(b)) == same
        shuffled = dict(reversed(list(a.items())))
        assert ex._key_bytes(shuffled) == ex._key_bytes(a)

    check()

    # pairs that plain concatenation would make equal: the lengths keep them apart
    def chat(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    tricky = [
        {"label": "a", "text": "b"},
        {"label": "atextsb"},
        chat(("user", "ab"), ("user", "c")),
        chat(("user", "a"), ("buser", "c")),
        chat(("user", "")),
        chat(("use", "r")),
        {"messages": []},
        {},
        {"text": ""},
    ]
    assert len({ex._key_bytes(t) for t in tricky}) == len(tricky)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {k: _train_tokenizer(k, root / k) for k in ("bert", "bpe")}


def _examples(recipe):
    return old.prepare(recipe)


TOKENIZE_CASES = [
    # (layout name, tokenizer, data options)
    ("cls-jsonl", "bert", {"max_length": 8}),
    ("cls-jsonl", "bert", {"max_length": 64}),
    ("cls-jsonl", "bpe", {"max_length": 6}),
    ("text", "bpe", {"max_length": 7}),
    ("text", "bpe", {"max_length": 64, "add_eos": False}),
    ("completion", "bpe", {"max_length": 6}),
    ("completion", "bpe", {"max_length": 64, "loss_on": "all"}),
    ("instruction", "bpe", {"max_length": 12}),
    ("chat", "bpe", {"max_length": 20}),
    ("chat", "bpe", {"max_length": 64, "add_eos": False}),
    ("chat-system", "bpe", {"max_length": 9, "loss_on": "all"}),
    ("chat-system", "bpe", {"max_length": 64}),
]


@pytest.mark.parametrize(("layout", "tok", "opts"), TOKENIZE_CASES)
def test_tokenize_gives_exactly_todays_features(tmp_path, toks, layout, tok, opts):
    recipe = dict(_layouts(tmp_path))[layout]
    raw = recipe.to_mapping() if hasattr(recipe, "to_mapping") else None
    recipe = _with_data(recipe, opts)
    prepared = old.prepare(recipe)
    tokenizer = toks[tok]
    for s in ex.SPLITS:
        want = old.tokenize(prepared.splits[s], recipe, tokenizer, prepared.label2id)
        got = tk.tokenize(prepared.splits[s], recipe, tokenizer, prepared.label2id)
        assert isinstance(got.features, Features)
        assert list(got.features) == want.features, f"{layout} {opts} {s}"
        assert (got.truncated, got.dropped_no_target, got.tokens) == (
            want.truncated,
            want.dropped_no_target,
            want.tokens,
        )
        assert got.features.lengths.tolist() == [len(f["input_ids"]) for f in want.features]
    del raw


def _with_data(recipe, opts):
    import yaml

    m = yaml.safe_load(recipe.to_yaml())
    m["data"].update(opts)
    return recipe_from_mapping(m)


def test_tokenize_cuts_and_drops_are_counted_like_today(tmp_path, toks):
    """Prompts longer than max_length leave no target: dropped, and counted the same."""
    rows = [{"q": "what is " * (i % 9 + 1), "a": f" {i}"} for i in range(60)]
    r = _recipe(
        _jsonl(tmp_path / "c.jsonl", rows),
        "causal_lm",
        prompt_column="q",
        completion_column="a",
        max_length=8,
    )
    examples = old.prepare(r).splits["train"]
    want = old.tokenize(examples, r, toks["bpe"], None)
    got = tk.tokenize(examples, r, toks["bpe"], None)
    assert want.dropped_no_target > 0 and want.truncated > 0
    assert list(got.features) == want.features
    assert (got.truncated, got.dropped_no_target, got.tokens) == (
        want.truncated,
        want.dropped_no_target,
        want.tokens,
    )


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_tokenization_matches_and_writes_arrow(tmp_path, toks, start, monkeypatch):
    """From 1,000 examples on, num_proc worker processes: forked on Linux (the tokenizer
    inherited), spawned elsewhere (the tokenizer pickled)."""
    monkeypatch.setattr(pool, "START_METHOD", start)
    rows = _chat(1_100, seed=4)
    for i, r in enumerate(rows):  # all distinct, so none is dropped as shared between splits
        r["messages"][0]["content"] += f" ({i})"
    r = _recipe(
        _jsonl(tmp_path / "c.jsonl", rows),
        "causal_lm",
        messages_column="messages",
        num_proc=2,
        max_length=24,
        clean={"dedupe": False},
        split={"test": 0.05, "validation": 0.0},
    )
    prepared = ex.prepare(r)
    train = prepared.splits["train"]
    assert len(train) >= tk.PARALLEL_FROM
    want = old.tokenize(list(train), r, toks["bpe"], None)
    got = tk.tokenize(train, r, toks["bpe"], None, folder=tmp_path, name="train.features")
    assert (tmp_path / "train.features.arrow").is_file()
    assert not list(tmp_path.glob(".train.features.map"))  # the map's own files are gone
    assert list(got.features) == want.features
    assert want.dropped_no_target > 0 and want.truncated > 0  # counted in the workers
    assert (got.truncated, got.dropped_no_target, got.tokens) == (
        want.truncated,
        want.dropped_no_target,
        want.tokens,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_rows_taken_at_random_hold_about_one_batch_of_the_source(tmp_path):
    """``sparse_map``'s drop after each record batch: the same rows as Arrow's take, and the
    file's pages this process holds afterwards are at most about one batch, where taking the
    same rows without it holds most of the file."""
    import numpy as np

    from ftcli.data.rows import open_table, sparse_map, take_rows

    path = tmp_path / "src.arrow"
    schema = pa.schema([("text", pa.string())])
    with tk.TableWriter(path, schema) as w:
        for b in range(16):  # 16 batches of ~2 MiB
            w.table(pa.table({"text": [f"{b}-{i} " + "x" * 2000 for i in range(1000)]}, schema))

    def resident_mib() -> float:
        kib, here = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:
                    here = head[-1] == str(path)
                elif here and head[0] == "Rss:":
                    kib += int(head[1])
        return kib / 1024

    idx = np.random.RandomState(0).permutation(16_000)[:4_000]
    want = open_table(path).take(pa.array(idx)).column("text").to_pylist()
    held: list = []  # resident just before each drop: one batch's rows, never the file

    with sparse_map(path) as (table, drop):
        got = take_rows(table, idx, lambda: held.append(resident_mib()) or drop())
    assert len(held) == 16 and max(held) <= 3  # one ~2 MiB batch and the pages around it
    assert got.column("text").to_pylist() == want
    with sparse_map(path) as (table, drop):
        take_rows(table, idx)
        assert resident_mib() > 16  # of ~32 MiB: without the drop, most of the file


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_worker_streams_are_joined_batch_for_batch(tmp_path, monkeypatch, kernel_copy):
    """The workers' feature files (none, one or several record batches each) joined by copying
    their messages, in the kernel or (a file system that cannot) through this process: the same
    rows and batches, readable by datasets, each part removed once copied; a cut-off file
    refused."""
    import errno
    import os

    from datasets import Dataset

    if not kernel_copy:

        def cannot(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", cannot, raising=False)

    schema = tk.feature_schema("causal_lm")
    rng = random.Random(0)

    def batch(n):
        ids = [[rng.randrange(50) for _ in range(rng.randrange(1, 6))] for _ in range(n)]
        return pa.RecordBatch.from_pydict(
            {"input_ids": ids, "labels": ids, "length": [len(x) for x in ids]}, schema=schema
        )

    parts, batches = [], []
    for k, sizes in enumerate([[3], [], [2, 5, 1], [4]]):
        parts.append(tmp_path / f"part-{k}.arrow")
        with tk.TableWriter(parts[-1], schema) as w:
            for n in sizes:
                batches.append(batch(n))
                w.table(batches[-1])
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(parts[2].read_bytes()[:-3])
    whole = tmp_path / "whole.arrow"
    whole.write_bytes(parts[0].read_bytes())
    tk._join_streams(iter(parts), tmp_path / "all.arrow", remove=True)
    with pa.OSFile(str(tmp_path / "all.arrow")) as f:
        got = list(pa.ipc.open_stream(f))
    assert got == batches
    assert Dataset.from_file(str(tmp_path / "all.arrow"))["input_ids"] == sum(
        (b.column("input_ids").to_pylist() for b in batches), []
    )
    assert not any(p.exists() for p in parts)
    with pytest.raises(ValueError, match="not a whole Arrow IPC stream"):
        tk._join_streams([whole, cut], tmp_path / "bad.arrow")


def test_feature_view_is_a_read_only_list_with_lengths(tmp_path, toks):
    r = _recipe(_jsonl(tmp_path / "t.jsonl", sentiment_rows(40)), max_length=16)
    p = ex.prepare(r)
    t = tk.tokenize(p.splits["train"], r, toks["bert"], p.label2id)
    f = t.features
    rows = list(f)
    assert f[0] == rows[0] and f[-1] == rows[-1] and f[2:5] == rows[2:5]
    assert f.__getitems__([3, 1]) == [rows[3], rows[1]]
    assert rows[0]["attention_mask"] == [1] * len(rows[0]["input_ids"])
    assert isinstance(rows[0]["labels"], int)
    with pytest.raises(IndexError):
        f[len(f)]
    assert f == rows and len(f) == len(rows)


def test_write_data_and_read_data_round_trip(tmp_path, toks):
    r = _recipe(_jsonl(tmp_path / "t.jsonl", _noisy_sentiment(120)), max_length=10)
    folder = tmp_path / "prepared"
    folder.mkdir()
    write_data(r, toks["bert"], folder)
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert outside == ["prepared", "t.jsonl"]  # nothing written beside the folder
    prepared, tokenized = read_data(folder)
    want = old.prepare(r)
    for s in ex.SPLITS:
        assert list(prepared.splits[s]) == want.splits[s]
        w = old.tokenize(want.splits[s], r, toks["bert"], want.label2id)
        assert list(tokenized[s].features) == w.features
        assert tokenized[s].truncated == w.truncated and tokenized[s].tokens == w.tokens
    # the length the data stage chose is recorded beside what prepare() counted
    assert prepared.stats.pop("max_length") == {"policy": "explicit", "value": 10}
    assert prepared.labels == want.labels and prepared.stats == want.stats
    (folder / "test.features.arrow").write_bytes(b"ARROW1 truncated")
    with pytest.raises(DataError, match="test split cannot be read"):
        read_data(folder)
    with pytest.raises(DataError, match="not a prepared data folder"):
        read_data(tmp_path)


def test_run_folder_train_split_as_arrow_when_big(tmp_path, monkeypatch):
    """Small training splits stay train.jsonl; big ones train.arrow; the digests are those of
    the jsonl text either way, so --resume's check reads old and new run folders alike."""
    from ftcli.rundir import check_same_data

    r = _recipe(_jsonl(tmp_path / "t.jsonl", sentiment_rows(100)))
    p = ex.prepare(r)
    small = tmp_path / "small"
    ex.save_prepared(p, small)
    assert sorted(x.name for x in small.iterdir()) == [
        "data.json",
        "labels.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    monkeypatch.setattr(ex, "TRAIN_JSONL_MAX", 10)
    big = tmp_path / "big"
    saved = ex.save_prepared(p, big)
    assert (big / "train.arrow").is_file() and not (big / "train.jsonl").exists()
    assert (big / "test.jsonl").is_file() and (big / "validation.jsonl").is_file()
    assert saved.stats["sha256"] == json.loads((small / "data.json").read_text())["sha256"]
    back = ex.load_prepared(big)
    assert isinstance(back.splits["train"], Rows)
    assert list(back.splits["train"]) == list(p.splits["train"])
    check_same_data(p, big)
    check_same_data(p, small)
    other = ex.prepare(_recipe(tmp_path / "t.jsonl", split={"seed": 9}))
    with pytest.raises(Exception, match="differs from the one this run started with"):
        check_same_data(other, big)


def test_take_rows_reads_only_the_batches_it_needs_and_keeps_the_order():
    """Rows.__getitems__ (every training batch) and the split writer use take_rows: the rows of
    many record batches, in the order asked, without Arrow joining the whole column first."""
    from ftcli.data.rows import take_rows

    batches = [
        pa.RecordBatch.from_pylist([{"ids": [i, i + 1], "k": i} for i in range(b, b + 10)])
        for b in range(0, 100, 10)
    ]
    table = pa.Table.from_batches(batches)
    rng = random.Random(0)
    for _ in range(20):
        idx = [rng.randrange(100) for _ in range(rng.randint(1, 30))]
        got = take_rows(table, idx)
        assert got.column("k").to_pylist() == idx
        assert got.equals(table.take(pa.array(idx)).combine_chunks())
    # in a fresh process, so Arrow's high-water mark of allocations says what each take held
    probe = (
        "import pyarrow as pa\n"
        "from ftcli.data.rows import take_rows\n"
        "b = pa.RecordBatch.from_pylist([{'ids': list(range(2000))}] * 100)\n"
        "wide = pa.Table.from_batches([b] * 50)\n"  # 50 batches of 100 rows x 8 KB: 40 MB
        "pool = pa.default_memory_pool(); m = pool.max_memory()\n"
        "take_rows(wide, [4999, 0, 2500]); ours = pool.max_memory() - m\n"
        "wide.take(pa.array([4999, 0, 2500])); plain = pool.max_memory() - m\n"
        "print(ours, plain)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    ours, plain = map(int, out.stdout.split())
    assert plain > 30 * 2**20  # what Arrow's own take holds: the joined column
    assert ours < 2**20
    with pytest.raises(IndexError):
        take_rows(table, [100])


def test_the_mask_from_span_ends_is_the_offsets_mask(toks):
    """For a byte-level BPE tokenizer the target mask is found from the tokens at each span's
    ends, without reading every token's offsets: the same mask as the offsets give, for any
    text (multi-byte characters split over byte tokens, special tokens inside) and any spans."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = toks["bpe"]
    assert tk.ordered_offsets(tok)
    backend = tok.backend_tokenizer
    pieces = st.sampled_from(
        ["hello", " there", "é", "👋🏽", "日本", "<|im_end|>", "\n", "  ", "?"]
    )

    @st.composite
    def case(draw):
        text = "".join(draw(st.lists(pieces, min_size=1, max_size=12)))
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), min_size=2, max_size=6)))
        return text, [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]

    @settings(max_examples=400, deadline=None)
    @given(case())
    def check(c):
        text, spans = c
        e = backend.encode(text, add_special_tokens=False)
        got = tk._mask_at(e, spans, len(e.ids))
        assert got is not None
        assert got.tolist() == tk._overlapping(e.offsets, spans).tolist()

    check()
    e = backend.encode("hi there", add_special_tokens=False)
    assert tk._mask_at(e, [(3, 3)], len(e.ids)) is None  # an empty span: the offsets decide


def test_only_byte_level_tokenizers_skip_reading_offsets(toks):
    """A normalizer, a prefix space, a word-piece model or offsets trimmed after tokenizing
    can move or empty a token's characters: those tokenizers' offsets are read."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

    assert tk.ordered_offsets(toks["bpe"]) and not tk.ordered_offsets(toks["bert"])

    def variant(change):
        copy = type(toks["bpe"])(
            tokenizer_object=Tokenizer.from_str(toks["bpe"].backend_tokenizer.to_str())
        )
        change(copy.backend_tokenizer)
        return tk.ordered_offsets(copy)

    assert variant(lambda b: None)
    assert not variant(lambda b: setattr(b, "normalizer", normalizers.NFC()))
    assert not variant(
        lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True))
    )
    assert not variant(
        lambda b: setattr(b, "post_processor", processors.ByteLevel(trim_offsets=True))
    )
    assert variant(lambda b: setattr(b, "post_processor", processors.ByteLevel(trim_offsets=False)))
    # Llama 3's shape: a regex split, then byte-level without its own regex; a sequence after
    llama3_pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    llama3_post = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(single="$A")]
    )
    assert variant(lambda b: setattr(b, "pre_tokenizer", llama3_pre))
    assert variant(lambda b: setattr(b, "post_processor", llama3_post))
    assert not variant(
        lambda b: setattr(
            b,
            "pre_tokenizer",
            pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.ByteLevel()]),
        )
    )
