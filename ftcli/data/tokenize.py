"""Examples -> model-ready features: tokenization (labels mask all but the completion for causal
LMs), chat rendering, and the collate that pads a micro-batch."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ftcli.data import pool
from ftcli.data.chat import FALLBACK_ROLE as FALLBACK_ROLE
from ftcli.data.chat import first_user, generation_problem, marks_generation, segments
from ftcli.data.chat import render_chat as render_chat
from ftcli.data.messages import without_nulls
from ftcli.data.rows import Features, Scratch, TableWriter
from ftcli.errors import DataError
from ftcli.recipe import Recipe
from ftcli.recipe.schema import TRAIN_ON

IGNORE_INDEX = -100


def _chat_segments(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns (the targets),
    unchecked (``chat.segments`` has the check's verdict too)."""
    seg = segments(tokenizer, messages)
    return seg.text, seg.spans


def chat_refusal(
    index: int, messages: list[dict], problem: str, split: str | None = None
) -> DataError:
    """The error that stops tokenizing a conversation the chat template renders in a way its
    assistant spans cannot be found from (data/chat.py's check)."""
    where = f"{split} example" if split else "example"
    return DataError(
        f"{where} {index + 1} (user: {first_user(messages)}): the chat template cannot be masked "
        f"safely: {problem}",
        hint="pick another template with data.chat_template (e.g. chatml), or fix the model's "
        "own; `ftcli validate RECIPE` lists every example that fails",
    )


def prompt_and_target(tokenizer, example: dict) -> tuple[str, str]:
    """(prompt text, reference answer) of a causal-LM example, for generation."""
    if "messages" in example:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return render_chat(tokenizer, msgs[:last], add_generation_prompt=True), msgs[last][
            "content"
        ]
    if "prompt" in example:
        return example["prompt"], example["completion"]
    return "", example["text"]


@dataclass(frozen=True)
class Tokenized:
    """Model-ready features of one split, and what tokenization had to cut. ``features``: a
    ``rows.Features`` sequence (Arrow-backed; ``.lengths`` per example) or a list of dicts."""

    features: Sequence[dict]
    truncated: int
    dropped_no_target: int
    tokens: int
    extra_windows: int | None = None  # long_documents windows: windows beyond each document's first

    def record(self) -> dict:
        """What run.json, data.json and ``ftcli prepare --json`` say of the split."""
        return {
            "examples": len(self.features),
            "tokens": self.tokens,
            "truncated": self.truncated,
            "dropped_no_target": self.dropped_no_target,
        }

    def summary(self, max_length: int) -> str:
        s = f"{len(self.features)} examples, {self.tokens:,} tokens"
        if self.extra_windows is not None:
            docs = len(self.features) - self.extra_windows
            s = f"{docs} documents as {len(self.features)} windows, {self.tokens:,} tokens"
        if self.truncated:
            s += f"; {self.truncated} truncated to {max_length} tokens"
        if self.dropped_no_target:
            s += f"; {self.dropped_no_target} dropped (no answer token left after truncation)"
        return s


# Below this many examples tokenization runs in this process: starting worker processes would
# cost more than it saves (tests, the quickstart).
PARALLEL_FROM = 1_000
BATCH = 1_000  # examples per tokenizer call
# features are written in record batches of about this many bytes: each batch's header is a
# page the reader touches, and the kernel maps the pages around it too (64 KiB a fault), so
# 784 batches of 250 rows (200k conversations) made opening the file 48 MiB of resident memory
WRITE_BYTES = 64 << 20
# a worker's batches: held until written, twice over while joined, in each worker at once. More
# batches cost a reader pages on opening (0.25-0.6 MiB each, by machine: 16 batches at 20k
# conversations, ~64 at 200k), fewer cost the workers memory
WORKER_WRITE_BYTES = 16 << 20
# per call in the worker processes: a batch of long conversations with character offsets is
# hundreds of MiB in Python objects, held once per worker
MAP_BATCH = 250


def feature_schema(task: str, windows: bool = False):
    """The Arrow schema of tokenized features: ids, labels (a class id, or one per token) and
    each example's length (``windows``: and the document each window reads); ``truncated`` and
    ``keep`` only while tokenizing."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    labels = pa.int64() if task == "classification" else ids
    fields = [("input_ids", ids), ("labels", labels), ("length", pa.int32())]
    return pa.schema(fields + ([("doc", pa.int64())] if windows else []))


def work_schema(schema):
    """``schema`` and the columns tokenization adds while it runs (``truncated``, ``keep``)."""
    import pyarrow as pa

    return schema.append(pa.field("truncated", pa.bool_())).append(pa.field("keep", pa.bool_()))


def _classification_batch(
    examples: list[dict], *, tokenizer, L: int, label2id, windows: bool = False, offset: int = 0
) -> dict:
    """Classification features of a batch: the text truncated to ``L`` tokens, the class id;
    ``windows``: every window of the text (data/windows.py), each with its document's index
    (``offset``: the batch's first example's index in the split)."""
    texts = [e["text"] for e in examples]
    if windows:
        from ftcli.data.windows import encode

        enc, owner = encode(tokenizer, texts, L)
        ids = [list(f) for f in enc["input_ids"]]
        return {
            "input_ids": ids,
            "labels": [label2id[examples[d]["label"]] for d in owner],
            "length": [len(f) for f in ids],
            "doc": [offset + d for d in owner],
            "truncated": [False] * len(ids),
            "keep": [True] * len(ids),
        }
    full = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
    cut = [i for i, f in enumerate(full) if len(f) > L]
    ids = [list(f) for f in full]
    if cut:  # only the long ones are encoded again, truncated (special tokens kept)
        enc = tokenizer([texts[i] for i in cut], truncation=True, max_length=L)["input_ids"]
        for i, f in zip(cut, enc, strict=True):
            ids[i] = list(f)
    return {
        "input_ids": ids,
        "labels": [label2id[e["label"]] for e in examples],
        "length": [len(f) for f in ids],
        "truncated": [len(f) > L for f in full],
        "keep": [True] * len(ids),
    }


def causal_params(d) -> dict:
    """The data keys a causal-LM batch is tokenized by (``_causal_batch``'s keywords)."""
    params = {"L": d.max_length, "loss_on": d.loss_on, "add_eos": d.add_eos}
    if d.train_on is not None:
        params["train_on"] = tuple(d.train_on)
    return params


def _causal_batch(
    examples: list[dict],
    *,
    tokenizer,
    L: int,
    loss_on: str,
    add_eos: bool,
    train_on: tuple[str, ...] = TRAIN_ON,
    offset: int = 0,
    split: str | None = None,
    check: bool = True,
    as_table: bool = False,
):
    """Causal-LM features of a batch: labels mask everything but the completion (``loss_on``;
    of an assistant turn, the parts ``train_on`` names), EOS appended (``add_eos``), truncated to
    ``L``; ``keep`` False when no target token is left. Columns of lists, or (``as_table``) an
    Arrow table of ``work_schema``, built from the arrays without a Python int per token (what
    tokenize writes). A conversation whose assistant spans fail
    the chat check (data/chat.py) stops it: DataError naming the example (``offset``: the batch's
    first example's index in ``split``)."""
    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    marked = loss_on != "all" and marks_generation(tokenizer)  # checked against the spans
    texts, spans, special, turns = [], [], [], []
    for k, e in enumerate(examples):
        if "messages" in e:
            seg = segments(tokenizer, e["messages"], train_on)
            if check and seg.problem is not None:
                raise chat_refusal(offset + k, e["messages"], seg.problem, split)
            text, sp = seg.text, seg.target_spans
            turns.append(seg.spans)
            special.append(False)
        elif "prompt" in e:
            text = e["prompt"] + e["completion"]
            sp = [(len(e["prompt"]), len(e["prompt"]) + len(e["completion"]))]
            special.append(True)
        else:
            text, sp = e["text"], [(0, len(e["text"]))]
            special.append(True)
        if special[-1]:
            turns.append(sp)
        texts.append(text)
        spans.append(sp)
    encoded: list = [None] * len(texts)
    for flag in (True, False):
        at = [i for i, s in enumerate(special) if s is flag]
        # a conversation's mask found from its spans' ends (its offsets not read), unless the
        # generation check needs the offsets or every token is a target
        ends = None if flag or marked or loss_on == "all" else [spans[i] for i in at]
        got = _encode(tokenizer, [texts[i] for i in at], flag, ends, loss_on != "all")
        for i, e in zip(at, got, strict=True):
            encoded[i] = e
    import numpy as np

    out: dict = {"input_ids": [], "labels": [], "length": [], "truncated": [], "keep": []}
    for k, (text, sp, (ids, offsets, found)) in enumerate(zip(texts, spans, encoded, strict=True)):
        if loss_on == "all":
            mask = np.ones(len(ids), dtype=bool)
        else:
            mask = found if found is not None else _overlapping(offsets, sp)
        if marked and check and not special[k]:  # the blocks mark whole assistant turns
            messages = examples[k]["messages"]
            whole = mask if turns[k] is sp else _overlapping(offsets, turns[k])
            problem = generation_problem(tokenizer, messages, ids, whole)
            if problem is not None:
                raise chat_refusal(offset + k, messages, problem, split)
        if add_eos and eos_id is not None and not (eos and ends_with(text, eos)):
            ids = np.append(ids, eos_id)
            # a target, except after a turn end train_on leaves out (a conversation whose last
            # turn is context: learning to stop there would be learning from context)
            mask = np.append(mask, sp is turns[k] or bool(mask[-1:].any()))
        truncated = len(ids) > L
        if truncated:
            ids, mask = ids[:L], mask[:L]
        keep = bool(mask.any())
        if not keep:
            ids = mask = ids[:0]
        out["truncated"].append(truncated)
        out["keep"].append(keep)
        out["input_ids"].append(ids)
        out["labels"].append(np.where(mask, ids, IGNORE_INDEX))
        out["length"].append(len(ids))
    if as_table:
        return _feature_table(out)
    for c in ("input_ids", "labels"):
        out[c] = [a.tolist() for a in out[c]]
    return out


def ends_with(text: str, tail: str) -> bool:
    """``text.rstrip().endswith(tail)`` without copying the text (that copy of every rendered
    conversation was 1-2% of a tokenizing worker's time)."""
    end = len(text)
    while end and text[end - 1].isspace():
        end -= 1
    return text.endswith(tail, 0, end)


def _feature_table(columns: dict):
    """``_causal_batch``'s columns (token columns as numpy arrays) as one Arrow table."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(columns["length"]) + 1, dtype=np.int32)
    np.cumsum(columns["length"], out=offsets[1:])
    full = work_schema(feature_schema("causal_lm"))

    def tokens(arrays):
        flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    cols = [tokens(columns["input_ids"]), tokens(columns["labels"])]
    cols += [pa.array(columns[c], full.field(c).type) for c in ("length", "truncated", "keep")]
    return pa.Table.from_arrays(cols, schema=full)


def _encode(tokenizer, texts: list[str], special: bool, spans=None, offsets: bool = True) -> list:
    """(ids, character offsets, target mask) of each text as numpy arrays (ids int64; offsets
    n x 2, None when not asked for or not needed; mask None unless found from ``spans``). A fast
    tokenizer with no truncation or padding set on it is asked directly (``encode_batch``, what
    transformers' call runs then), its offsets read without a Python tuple per token; any
    other through transformers' call. ``spans``: each text's target spans; where the
    tokenizer's offsets are known to run in order over every character (``ordered_offsets``),
    the mask comes from the tokens at the spans' ends (``_mask_at``) and the offsets, a Python
    tuple per token and about a tenth of the CPU time here, are not read."""
    import itertools

    import numpy as np

    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        ordered = spans is not None and ordered_offsets(tokenizer)
        out = []
        for k, e in enumerate(backend.encode_batch(texts, add_special_tokens=special)):
            ids = np.array(e.ids, dtype=np.int64)
            mask = _mask_at(e, spans[k], len(ids)) if ordered else None
            off = None
            if mask is None and offsets:
                flat = itertools.chain.from_iterable(e.offsets)
                off = np.fromiter(flat, np.int64, 2 * len(ids)).reshape(-1, 2)
            out.append((ids, off, mask))
        return out
    enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    return [
        (np.asarray(ids, dtype=np.int64), np.asarray(off, dtype=np.int64).reshape(-1, 2), None)
        for ids, off in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def _mask_at(encoding, spans, n: int):
    """The tokens overlapping ``spans`` (``_overlapping``'s mask), found from each span's first
    and last character: the first token holding the first, through the last token starting
    before the span's end. Exact when offsets never go back and no token is empty
    (``ordered_offsets``); None (read the offsets) for an empty span or a character no token
    holds."""
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    for s, t in spans:
        if t <= s:  # an empty span marks a token around its position: the offsets tell
            return None
        lo, hi = encoding.char_to_token(s), encoding.char_to_token(t - 1)
        if lo is None or hi is None:
            return None
        while hi + 1 < n:  # a character split over several tokens (bytes): all of them
            nxt = encoding.token_to_chars(hi + 1)
            if nxt is None or nxt[0] >= t:
                break
            hi += 1
        mask[lo : hi + 1] = True
    return mask


# Pipeline parts whose offsets run in order over every character with no empty token, for a text
# encoded without special tokens: byte-level BPE (each token is at least one byte of the text, in
# the text's order) with no normalizer (one could move characters) and no prefix space (added
# before the first character).
_ORDERED_PRE = {"ByteLevel", "Split", "Digits"}
_ORDERED_POST = {"TemplateProcessing", "ByteLevel"}
_ORDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ordered_offsets(tokenizer) -> bool:
    """Whether ``_mask_at`` gives exactly the offsets' mask for this fast tokenizer (texts
    without special tokens): every part of its pipeline is on the lists above, as its own
    description says (read once per tokenizer)."""
    try:
        return _ORDERED[tokenizer]
    except KeyError:
        pass
    except TypeError:  # takes no weak reference: not worth reading its description per batch
        return False
    import json

    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:  # noqa: BLE001 (no description: read the offsets)
        return False

    def parts(node) -> list[dict]:
        if node is None:
            return []
        if node.get("type") != "Sequence":
            return [node]
        inner = node.get("pretokenizers") or node.get("processors") or []
        return [p for n in inner for p in parts(n)]

    pre, post = parts(spec.get("pre_tokenizer")), parts(spec.get("post_processor"))
    ok = (
        spec.get("normalizer") is None
        and (spec.get("model") or {}).get("type") == "BPE"
        and any(p.get("type") == "ByteLevel" for p in pre)
        and all(p.get("type") in _ORDERED_PRE and not p.get("add_prefix_space") for p in pre)
        and all(p.get("type") in _ORDERED_POST for p in post)
        and not any(p.get("type") == "ByteLevel" and p.get("trim_offsets") for p in post)
    )
    _ORDERED[tokenizer] = ok
    return ok


def _overlapping(offsets, spans):
    """Per token: whether its characters overlap one of ``spans`` (a token of no character: no)."""
    import numpy as np

    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    a, b = off[:, 0], off[:, 1]
    mask = np.zeros(len(off), dtype=bool)
    for s, t in spans:
        mask |= (s < b) & (a < t)
    return mask & (b > a)


def features_batch(
    batch: dict,
    indices=None,
    *,
    task: str,
    tokenizer,
    params: dict,
    offset: int = 0,
    as_table: bool = False,
):
    """One batch of examples (columns: an Arrow slice's ``to_pydict()``) -> feature columns plus
    ``truncated`` and ``keep`` (a causal LM's ``as_table``: as one Arrow table). Module-level,
    so a spawned worker process can unpickle it."""
    if task in ("preference", "reward"):  # chosen/rejected pairs, KTO rows: data/pairs.py
        from ftcli.data.pairs import pairs_batch

        return pairs_batch(batch, tokenizer=tokenizer, render=render_chat, **params)
    cols = list(batch)
    examples = [dict(zip(cols, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
    for e in examples:  # through Arrow every message has every field: null where it has none
        if "messages" in e and any(len(m) > 2 for m in e["messages"]):
            e["messages"] = without_nulls(e["messages"])
    if indices:  # the batch's rows' indices in the split
        offset = indices[0]
    if task == "classification":
        return _classification_batch(examples, tokenizer=tokenizer, offset=offset, **params)
    return _causal_batch(examples, tokenizer=tokenizer, offset=offset, as_table=as_table, **params)


def _columns(rows: list[dict]) -> dict:
    cols = list(rows[0]) if rows else []
    return {c: [r[c] for r in rows] for c in cols}


def tokenize(
    examples: Sequence[dict],
    recipe: Recipe,
    tokenizer,
    label2id: dict[str, int] | None,
    folder: Path | None = None,
    name: str = "features",
    check_chat: bool = True,
) -> Tokenized:
    """Tokenize canonical examples (a list or ``rows.Rows``) in batches; labels mask everything
    but the completion for causal LMs. The features go to ``folder/<name>.arrow`` (else a
    temporary file, or memory for small splits) and come back as a memory-mapped ``Features``.
    From PARALLEL_FROM examples on, ``data.num_proc`` worker processes tokenize
    (``_map_parallel``).
    ``check_chat``: a conversation that fails the chat check (data/chat.py) is a DataError;
    False for passes that only measure (the length choice) or re-read a trained run's data."""
    d = recipe.data
    if not isinstance(d.max_length, int):  # a caller's bug, not the user's: say where it goes
        raise TypeError("tokenize() needs data.max_length resolved (ftcli.data.lengths.resolve)")
    task = recipe.task
    windows = task == "classification" and d.long_documents == "windows"
    if task == "classification":
        params = {"L": d.max_length, "label2id": label2id}
        if windows:
            params["windows"] = True
    else:
        params = causal_params(d)
        if not check_chat:
            params["check"] = False
        if name.endswith(".features"):  # write_data's "<split>.features": errors name the split
            params["split"] = name.removesuffix(".features")
    fn = partial(features_batch, task=task, tokenizer=tokenizer, params=params, as_table=True)
    schema = feature_schema(task, windows)
    if task in ("preference", "reward"):  # data/pairs.py: its params, schema and column view
        from ftcli.data.pairs import setup

        examples, params, schema = setup(examples, recipe)
        fn = partial(features_batch, task=task, tokenizer=tokenizer, params=params)
    n = len(examples)
    keep = None
    if folder is None and n >= PARALLEL_FROM:
        keep = Scratch()
        folder = keep.path
    procs = min(pool.num_procs(recipe), -(-n // BATCH)) if n >= PARALLEL_FROM else 1
    if windows:  # a window's document index counts from its batch's offset: one process
        procs = 1
    if folder is None:  # small: in memory
        parts = [fn(_columns(list(examples[s : s + BATCH])), offset=s) for s in range(0, n, BATCH)]
        return _windows_counted(_collect(parts, schema, None, None), n, windows)
    path = Path(folder) / f"{name}.arrow"
    if procs > 1:
        counts = _map_parallel(examples, fn, procs, path, schema)
        return _windows_counted(Tokenized(Features.open(path, keep), *counts), n, windows)
    parts = (fn(_columns(list(examples[s : s + BATCH])), offset=s) for s in range(0, n, BATCH))
    return _windows_counted(_collect(parts, schema, path, keep), n, windows)


def _windows_counted(t: Tokenized, documents: int, windows: bool) -> Tokenized:
    """``t`` with the windows beyond each document's first counted (long_documents: windows)."""
    return replace(t, extra_windows=len(t.features) - documents) if windows else t


def _kept(part, schema, counts: list[int]):
    """A feature batch (a dict of columns or an Arrow table of ``work_schema``) as a table of
    ``schema`` holding the examples kept; adds its truncated, dropped and token counts to
    ``counts``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = (
        part
        if isinstance(part, pa.Table)
        else pa.Table.from_pydict(part, schema=work_schema(schema))
    )
    if not t.num_rows:
        return t.select(schema.names).cast(schema)
    kept = t["keep"]
    counts[0] += int(pc.sum(t["truncated"]).as_py() or 0)
    counts[1] += t.num_rows - int(pc.sum(kept).as_py() or 0)
    t = t.filter(kept).select(schema.names).cast(schema)
    counts[2] += int(pc.sum(t["length"]).as_py() or 0) if t.num_rows else 0
    return t


def _write_kept(
    parts, schema, path: Path | None, counts: list[int], flush: int = WRITE_BYTES
) -> list:
    """``_kept`` of each part, written to ``path`` in record batches of about ``flush`` bytes, or
    (no path) returned as a list of tables."""
    import pyarrow as pa

    tables, held = [], 0
    writer = TableWriter(path, schema) if path is not None else None
    try:
        for part in parts:
            t = _kept(part, schema, counts)
            if not t.num_rows:
                continue
            tables.append(t)
            held += t.nbytes
            if writer is not None and held >= flush:  # the held parts as one batch
                writer.table(pa.concat_tables(tables).combine_chunks())
                tables, held = [], 0
        if writer is not None and tables:
            writer.table(pa.concat_tables(tables).combine_chunks())
            tables = []
    finally:
        if writer is not None:
            writer.close()
    return tables


def _collect(parts, schema, path: Path | None, keep) -> Tokenized:
    """Feature batches (dicts of columns, or Arrow tables) -> a Tokenized, counting what was cut;
    written to ``path`` (memory-mapped back) or held in memory."""
    import pyarrow as pa

    counts = [0, 0, 0]  # truncated, dropped, tokens
    tables = _write_kept(parts, schema, path, counts)
    if path is not None:
        feats = Features.open(path, keep)
    else:
        feats = Features(pa.concat_tables(tables) if tables else schema.empty_table())
    return Tokenized(feats, *counts)


TASKS_PER_PROC = 8  # row ranges per worker: the last ones finish close together


def _map_task(task: tuple, fn):
    """One worker's row range: its examples read from the memory-mapped Arrow file (unmapped
    when the call returns and its views go, so a worker holds at most its range's pages),
    tokenized MAP_BATCH at a time, the examples kept written to ``out`` as the final file's
    record batches (``_write_kept``). Returns (out, the counts, None); a DataError comes back
    as (None, None, (message, hint)): the main process raises it (an FtcliError does not
    survive pickling whole)."""
    import pyarrow as pa

    src, start, stop, out, schema = task
    counts = [0, 0, 0]
    with pa.memory_map(src) as mm:
        table = pa.ipc.open_stream(mm).read_all().slice(start, stop - start)

        def parts():
            for s in range(0, table.num_rows, MAP_BATCH):
                part = table.slice(s, MAP_BATCH)
                yield fn(part.to_pydict(), list(range(start + s, start + s + part.num_rows)))

        try:
            _write_kept(parts(), schema, Path(out), counts, WORKER_WRITE_BYTES)
        except DataError as exc:
            return None, None, (exc.message, exc.hint)
    return out, counts, None


_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # an Arrow IPC stream's end marker


def _copy_range(src, dst, left: int) -> None:
    """``left`` bytes from ``src``'s position to ``dst``'s (raw files): in the kernel where it
    can (``copy_file_range``: no pass through this process), else read and written."""
    while left:
        try:
            got = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30))
        except (AttributeError, OSError):  # not Linux, or a file system that cannot: copy here
            got = None
        if got is None:
            chunk = src.read(min(left, 8 << 20))
            got = len(chunk)
            if got:
                dst.write(chunk)
        if not got:  # shorter than it was a moment ago
            raise ValueError(f"{src.name}: not a whole Arrow IPC stream")
        left -= got


def _join_streams(parts, path: Path, remove: bool = False) -> None:
    """Arrow IPC stream files of one schema joined into ``path``, in the order ``parts`` (any
    iterable: the workers' files as each is done) gives them: the first one's schema message,
    then every file's record-batch messages, copied as bytes (each message is self-contained
    and 8-byte aligned, and feature schemas have no dictionaries), then the end marker.
    ``remove``: each part is deleted once copied (the disk holds the features about once)."""
    import pyarrow as pa

    with open(path, "wb", buffering=0) as dst:
        for k, part in enumerate(parts):
            with pa.OSFile(str(part)) as f:
                pa.ipc.read_message(f)  # the schema
                body = f.tell()
            with open(part, "rb", buffering=0) as src:
                end = src.seek(-len(_STREAM_END), os.SEEK_END)
                if end < body or src.read(len(_STREAM_END)) != _STREAM_END:
                    raise ValueError(f"{part}: not a whole Arrow IPC stream")
                _copy_range(src, dst, end - src.seek(0 if k == 0 else body))
            if remove:
                os.unlink(part)
        dst.write(_STREAM_END)


def _map_parallel(examples, fn, procs: int, path: Path, schema) -> list[int]:
    """``fn`` over the examples' batches in ``procs`` worker processes, each reading its row
    ranges from an Arrow file (the examples' own, or one written for a list) and writing the
    examples kept; their files are joined into ``path`` in order as each is done, while the
    workers go on (``_join_streams``: the main process decodes nothing), and removed. Returns
    the truncated, dropped and token counts."""
    import shutil

    import pyarrow as pa

    work = path.parent / f".{path.stem}.map"
    work.mkdir(parents=True, exist_ok=True)
    counts = [0, 0, 0]
    try:
        src = getattr(examples, "path", None)
        if src is None:  # a list: written once for the workers to map
            src = work / "examples.arrow"
            table = pa.Table.from_pylist(list(examples))
            with TableWriter(src, table.schema) as out:
                out.table(table)
        n = len(examples)
        step = max(MAP_BATCH, -(-n // (procs * TASKS_PER_PROC)))
        tasks = [
            (str(src), a, min(n, a + step), str(work / f"part-{i:05d}.arrow"), schema)
            for i, a in enumerate(range(0, n, step))
        ]

        def done(results):
            for out, got, failed in results:
                if failed is not None:
                    raise DataError(failed[0], hint=failed[1])
                counts[:] = [a + b for a, b in zip(counts, got, strict=True)]
                yield out

        with pool.workers(partial(_map_task, fn=fn), procs) as imap:
            _join_streams(done(imap(tasks)), path, remove=True)
    except BaseException:
        path.unlink(missing_ok=True)  # joined in part
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


# Micro-batch widths are rounded up to a multiple of this many positions. Fewer distinct tensor
# shapes let the allocator reuse freed blocks instead of growing: peak RSS of 20 bench steps fell
# 7-15% on the CPU (quickstart 1,320 -> 1,185 MiB, SmolLM2-135M classification 2,760 -> 2,340,
# chat SFT 3,730 -> 3,450) at the same step time; on CUDA 8 is also the tensor-core granule.
PAD_MULTIPLE = 8


def padded_width(n: int) -> int:
    """``n`` positions rounded up to a multiple of PAD_MULTIPLE."""
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def collate(features: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad a micro-batch to its longest example, rounded up to PAD_MULTIPLE (right padding, or
    ``left`` for a classifier that reads the last position: models.pads_left; pad labels are
    ignored)."""
    import torch

    n = padded_width(max(len(f["input_ids"]) for f in features))
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    seq_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long) if seq_labels else None
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        at = slice(n - k, n) if left else slice(0, k)
        ids[i, at] = torch.tensor(f["input_ids"])
        mask[i, at] = 1
        if seq_labels:
            labels[i, at] = torch.tensor(f["labels"])
    if not seq_labels:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing: example indices per row, each row at most ``row_tokens`` long."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def pack(
    features: list[dict],
    pad_id: int,
    row_tokens: int | None = None,
    varlen: bool = False,
    mask_dtype=None,
    mask: bool = True,
):
    """A causal-LM micro-batch without padding between examples: examples concatenated into rows,
    position ids restarting per example, and attention isolated per example.

    ``varlen`` (flash-attention): one row, no mask; transformers reads the example boundaries from
    the position ids. Otherwise rows of at most ``row_tokens`` (default: the longest example, so
    the rows never run more positions, or longer attention, than the padded batch would), their
    width rounded up to PAD_MULTIPLE, with an explicit 4D block-diagonal causal mask (additive,
    0 = attend, the dtype's minimum elsewhere) in ``mask_dtype`` (default float32), which must be
    the compute dtype: SDPA refuses a float32 mask with bf16 queries. Position ids alone leak
    attention across examples under eager and SDPA attention (docs/traps.md#packing-needs-a-mask);
    ``mask=False`` leaves the mask out for flex_attention, which builds its block mask from the
    position ids. Each example's first label is ignored, so no prediction crosses an example
    boundary: the loss equals the unpacked batch's.
    """
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    if varlen:
        rows = [list(range(len(features)))]
    else:
        rows = pack_rows(lengths, max(row_tokens or 0, max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = width if varlen else padded_width(width)  # the varlen kernel takes no padding
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            f, k = features[i], lengths[i]
            ids[r, at : at + k] = torch.tensor(f["input_ids"])
            labels[r, at + 1 : at + k] = torch.tensor(f["labels"][1:])
            pos[r, at : at + k] = torch.arange(k)
            seg[r, at : at + k] = s
            at += k
    out = {"input_ids": ids, "position_ids": pos, "labels": labels, "real_mask": (seg >= 0).long()}
    if mask and not varlen:
        idx = torch.arange(width)
        same = seg[:, :, None] == seg[:, None, :]
        causal = idx[None, :, None] >= idx[None, None, :]
        allowed = (same & causal & (seg[:, :, None] >= 0)) | torch.eye(width, dtype=torch.bool)
        add = torch.zeros((n, 1, width, width), dtype=mask_dtype or torch.float32)
        out["attention_mask"] = add.masked_fill_(~allowed[:, None], torch.finfo(add.dtype).min)
    return out
