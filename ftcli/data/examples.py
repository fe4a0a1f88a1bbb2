"""Records -> canonical examples (the task's layout), cleaned, split into train / validation /
sealed test, and written to (and read back from) the run's data/ folder."""

from __future__ import annotations

import collections
import contextlib
import difflib
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ftcli.data import pairs
from ftcli.data.messages import EXTRA_FIELDS, chat_message
from ftcli.data.read import CHUNK, read_source
from ftcli.data.rows import Rows, Scratch, TableWriter, jsonl_digest, sparse_map, take_rows
from ftcli.errors import DataError, FtcliError, RecipeError, SourceError
from ftcli.recipe import DataSpec, Recipe
from ftcli.sources import is_hub_spec, resolve_data
from ftcli.util import atomic_file, atomic_write_text, read_json, read_jsonl

SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------- mapping to examples


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value)


def _column_problem(recipe: Recipe, key: str, column: str, columns: list[str]):
    close = difflib.get_close_matches(column, columns, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else None
    return recipe.problem(
        key, f"column {column!r} is not in the data; its columns are: {', '.join(columns)}", hint
    )


def required_columns(recipe: Recipe, at: str = "data") -> dict[str, str]:
    """dotted recipe key -> column name, for every column the task reads (``at``: where the
    source's keys are: ``data``, or ``data.sources.N`` with ``recipe`` that source's view)."""
    d = recipe.data
    if recipe.task == "classification":
        return {f"{at}.text_column": d.text_column, f"{at}.label_column": d.label_col}
    if recipe.task in pairs.PAIR_TASKS:  # which columns depends on the layout (and an answer
        return {}  # may well be a number): pairs.missing_columns checks them
    keys = {
        "chat": ["messages_column"],
        "instruction": ["instruction_column", "output_column"]
        + (["input_column"] if d.input_column else []),
        "completion": ["prompt_column", "completion_column"],
        "text": ["text_column"],
    }[d.style]
    return {f"{at}.{k}": getattr(d, k) for k in keys}


def check_columns(recipe: Recipe, records: list[dict], source: str, at: str = "data") -> None:
    """Raise a located RecipeError when a named column is missing from the data."""
    if not records:
        raise DataError(
            f"the dataset is empty: {source} holds no records",
            hint="check data.path; a CSV needs a header row and at least one data row",
        )
    columns = list(records[0].keys())
    if recipe.task in pairs.PAIR_TASKS:  # one of several layouts, rows of two kinds in one file
        columns = list(dict.fromkeys(k for r in records[:1000] for k in r))
        missing = pairs.missing_columns(recipe, records, at)
    else:
        missing = {k: c for k, c in required_columns(recipe, at).items() if c not in records[0]}
    problems = [_column_problem(recipe, key, col, columns) for key, col in missing.items()]
    if recipe.task == "classification" and not recipe.data.label_column:
        problems = [
            recipe.problem(
                f"{at}.label_column",
                "classification needs a label column: the data has no column 'label' (the "
                f"default); its columns are: {', '.join(map(str, columns))}",
                "name the column that holds each example's label",
            )
            if p.key == f"{at}.label_column"
            else p
            for p in problems
        ]
    if problems:
        raise RecipeError(problems)


def to_examples(recipe: Recipe, records: list[dict], start: int = 0) -> list[dict]:
    """Records -> canonical examples: {"text","label"} | {"text"} | {"prompt","completion"} | {"messages"}.
    ``start``: how many records of the source came before these (for the record number in errors)."""
    d = recipe.data
    if recipe.task == "classification":
        return [
            {"text": _text(r.get(d.text_column)), "label": _text(r.get(d.label_col))}
            for r in records
        ]
    if recipe.task in pairs.PAIR_TASKS:  # the rows that make no example: pairs.clean_chunk
        return pairs.to_pair_examples(recipe, records, start)[0]
    if d.style == "text":
        return [{"text": _text(r.get(d.text_column))} for r in records]
    if d.style == "completion":
        return [
            {
                "prompt": _text(r.get(d.prompt_column)),
                "completion": _text(r.get(d.completion_column)),
            }
            for r in records
        ]
    system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
    out = []
    if d.style == "instruction":
        for r in records:
            user = _text(r.get(d.instruction_column))
            extra = _text(r.get(d.input_column)) if d.input_column else ""
            if extra.strip():
                user = f"{user}\n\n{extra}"
            out.append(
                {
                    "messages": system
                    + [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": _text(r.get(d.output_column))},
                    ]
                }
            )
        return out
    for i, r in enumerate(records):
        msgs = r.get(d.messages_column)
        if hasattr(msgs, "tolist"):  # numpy arrays from parquet
            msgs = msgs.tolist()
        if not isinstance(msgs, list) or not all(  # a turn of tool calls may have no content
            isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m)
            for m in msgs
        ):
            raise DataError(
                f"record {start + i + 1}: {d.messages_column!r} must be a list of {{role, content}} messages",
                hint='for example [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]',
            )
        where = f"record {start + i + 1}"
        out.append({"messages": system + [chat_message(m, where, _text) for m in msgs]})
    return out


# --------------------------------------------------------------------------- cleaning and splitting


def _strip(ex: dict) -> dict:
    out = {}
    for k, v in ex.items():
        if isinstance(v, str):
            out[k] = v.strip()
        elif k == "messages":
            out[k] = [_strip_message(m) for m in v]
        else:
            out[k] = v
    return out


def _strip_message(m: dict) -> dict:
    if len(m) == 2:  # role and content: the common case, kept fast
        return {"role": m["role"], "content": m["content"].strip()}
    out = {**m, "content": m["content"].strip()}
    if "reasoning_content" in out:
        out["reasoning_content"] = out["reasoning_content"].strip()
    return out


def _is_empty(ex: dict) -> bool:
    """No assistant turn with something to learn, or a message with nothing in it (an assistant
    turn of tool calls alone has no content)."""
    if "messages" in ex:
        msgs = ex["messages"]
        return not any(
            m["role"] == "assistant" and (m["content"] or "tool_calls" in m) for m in msgs
        ) or any(not (m["content"] or "tool_calls" in m) for m in msgs)
    return any(not v for v in ex.values() if isinstance(v, str))


def _key(ex: dict) -> str:
    return json.dumps(ex, sort_keys=True, ensure_ascii=False)


@dataclass
class CleanCounts:
    read: int = 0
    unlisted_label: int = 0
    empty: int = 0
    duplicate: int = 0
    kept: int = 0
    notes: list = field(default_factory=list)  # what encoding detection chose, per file
    bad: dict = field(default_factory=dict)  # preference data: bad rows per kind (pairs.BAD_WORDS)
    first_bad: str | None = None  # the first of them: "<file>: record N: why"


def _strip_and_drop(examples: list[dict], spec: DataSpec, counts: CleanCounts) -> list[dict]:
    """clean.strip and clean.drop_empty on a list (or a chunk) of examples, empties counted."""
    if spec.clean.strip:
        examples = [_strip(e) for e in examples]
    if spec.clean.drop_empty:
        kept = [e for e in examples if not _is_empty(e)]
        counts.empty += len(examples) - len(kept)
        examples = kept
    return examples


def clean(examples: list[dict], spec: DataSpec, counts: CleanCounts) -> list[dict]:
    counts.read += len(examples)
    examples = _strip_and_drop(examples, spec, counts)
    if spec.clean.dedupe:
        seen, kept = set(), []
        for e in examples:
            k = _key(e)
            if k not in seen:
                seen.add(k)
                kept.append(e)
        counts.duplicate += len(examples) - len(kept)
        examples = kept
    counts.kept += len(examples)
    return examples


def _split_off(
    idx: np.ndarray,
    labels: list | None,
    fraction: float,
    seed: int,
    stratify: bool,
    name: str,
    asked: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held): row indices, with ``fraction`` of ``idx`` held out, stratified by ``labels``
    (one per index) when possible. The same draw as splitting the examples themselves:
    train_test_split's choice depends only on their number and labels. ``name`` and ``asked`` (the
    recipe's data.split.<name>) word the error."""
    if fraction <= 0 or not len(idx):
        return idx, idx[:0]
    n_held = max(1, round(len(idx) * fraction))
    if n_held >= len(idx):
        n = len(idx)
        raise DataError(
            f"only {n} example{'' if n == 1 else 's'} left to split: too few to hold out a "
            f"{name} split (data.split.{name}: {asked:g}) and still train on something",
            hint=f"add data, or set data.split.{name} to 0",
        )
    counts = collections.Counter(labels) if labels is not None else {}
    can_stratify = (
        stratify
        and labels is not None
        and min(counts.values()) >= 2
        and n_held >= len(counts)
        and len(idx) - n_held >= len(counts)
    )
    if not can_stratify:  # train_test_split's own unstratified draw, without importing sklearn
        order = np.random.RandomState(seed).permutation(len(idx))  # (about 3 s on 2 cores)
        return idx[order[n_held:]], idx[order[:n_held]]
    from sklearn.model_selection import train_test_split

    rest, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=labels)
    return rest, held


def _cap(idx, limit: int | None, seed: int):
    """At most ``limit`` of ``idx`` (a seeded sample, in their order)."""
    if limit is None or len(idx) <= limit:
        return idx
    keep = sorted(random.Random(seed).sample(range(len(idx)), limit))
    if isinstance(idx, np.ndarray):
        return idx[keep]
    return [idx[i] for i in keep]


@dataclass(frozen=True)
class PreparedData:
    """The splits (canonical examples), the label map and what happened on the way."""

    splits: dict[str, Sequence[dict]]  # Rows (Arrow) or lists of example dicts
    labels: list[str] | None
    stats: dict = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels or [])}


def source_of(recipe: Recipe, spec: str):
    """``resolve_data``; a local path that is not there is located at its recipe key, with the
    folder relative paths are read from (the recipe's own)."""
    try:
        return resolve_data(spec)
    except SourceError as exc:
        d = recipe.data
        keys = [(f"data.{k}", getattr(d, k)) for k in ("path", "validation_path", "test_path")]
        keys += [(f"data.sources.{i}.path", s.path) for i, s in enumerate(d.sources or ())]
        key = next((k for k, v in keys if v == spec), None)
        if key is None or "not found" not in exc.message:
            raise
        written, folder = recipe._anchored.get(key, (None, None))
        where = f"{written!r} was looked for in {folder}" if written else None
        if (
            written
            and recipe._origin
            and recipe._origin.locate(tuple(key.split(".")))[0] != "--set"
        ):
            where += " (a recipe's relative paths are read from its own folder)"
        raise RecipeError(
            [recipe.problem(key, f"data not found: {spec} (no such file or folder)", where)]
        ) from exc


def load_examples(
    recipe: Recipe, spec: str, counts: CleanCounts, at: str = "data", located: Recipe | None = None
) -> list[dict]:
    """One source's records as cleaned canonical examples (``at``, ``located``: as ``_read_into``)."""
    source = source_of(located or recipe, spec)
    records = read_source(source, recipe.data, counts.notes)
    check_columns(recipe, records, spec, at)
    try:
        if recipe.task in pairs.PAIR_TASKS:
            return _clean_pairs(recipe, records, spec, counts)
        examples = to_examples(recipe, records)
    except DataError as exc:  # "record 7: ..." needs the file it is in
        raise DataError(f"{spec}: {exc.message}", hint=exc.hint) from None
    return clean(examples, recipe.data, counts)


def _clean_pairs(recipe: Recipe, records: list[dict], spec: str, counts: CleanCounts) -> list[dict]:
    """``clean`` for preference data: the bad rows dropped by kind, then empties and duplicates
    (a duplicate: the whole pair, prompt and both answers, seen before)."""
    examples = pairs.clean_chunk(recipe, records, 0, counts, spec)
    counts.read += len(records)
    if recipe.data.clean.dedupe:
        unique = {_key(e): e for e in reversed(examples)}  # the first copy of each
        kept = [e for e in examples if unique.get(_key(e)) is e]
        counts.duplicate += len(examples) - len(kept)
        examples = kept
    counts.kept += len(examples)
    return examples


# --------------------------------------------------------------------------- prepare, on Arrow

# A 16-byte hash of each canonical example (its ``_key``) stands for it in deduplication, the
# cross-split overlap checks and the splitting: the examples themselves stay on disk.
HASH = np.dtype([("a", "<u8"), ("b", "<u8")])


def _key_bytes(ex: dict) -> bytes:
    """The bytes an example is hashed by: equal exactly when the examples are (as ``_key``'s
    JSON is), written without JSON for the common shapes (strings; role/content messages),
    length-prefixed so no two examples share them; any other shape: ``_key``, whose leading
    brace no length-prefixed form has."""
    out = ["\x00"]
    for k in sorted(ex):
        v = ex[k]
        if type(v) is str:
            out.append(f"{len(k)}:{k}s{len(v)}:{v}")
        elif k == "messages" and type(v) is list and all(_plain_message(m) for m in v):
            out.append(f"{len(k)}:{k}m{len(v)}:")
            out += [f"{len(m['role'])}:{m['role']}{len(m['content'])}:{m['content']}" for m in v]
        else:
            return _key(ex).encode("utf-8", "surrogatepass")
    return "".join(out).encode("utf-8", "surrogatepass")


def _plain_message(m) -> bool:
    return (
        type(m) is dict
        and len(m) == 2
        and type(m.get("role")) is str
        and type(m.get("content")) is str
    )


def _hashes(examples: list[dict]) -> np.ndarray:
    digests = b"".join(hashlib.blake2b(_key_bytes(e), digest_size=16).digest() for e in examples)
    return np.frombuffer(digests, dtype=HASH).copy()


def schema_of(recipe: Recipe):
    """The Arrow schema of the recipe's canonical examples (``to_examples``' keys, in order)."""
    import pyarrow as pa

    s = pa.string()
    if recipe.task == "classification":
        return pa.schema([("text", s), ("label", s)])
    if recipe.task in pairs.PAIR_TASKS:
        return pairs.arrow_schema()
    if recipe.data.style == "text":
        return pa.schema([("text", s)])
    if recipe.data.style == "completion":
        return pa.schema([("prompt", s), ("completion", s)])
    fields = [("role", s), ("content", s), *((k, s) for k in EXTRA_FIELDS)]
    return pa.schema([("messages", pa.list_(pa.struct(fields)))])


@dataclass
class _Source:
    """One source's examples after strip/drop_empty, on disk, and what splitting needs of them."""

    rows: Rows  # every example that survived strip and drop_empty
    kept: np.ndarray  # row indices still in play (dedupe, labels, overlap remove the others)
    hashes: np.ndarray  # HASH per row
    codes: np.ndarray | None  # label code per row (classification)


def _read_into(
    out: TableWriter,
    recipe: Recipe,
    spec: str,
    counts: CleanCounts,
    names: dict[str, int],
    at: str = "data",
    tag: str | None = None,
    located: Recipe | None = None,
) -> tuple[int, list, list]:
    """One source's records, read, mapped and cleaned (strip, drop_empty) chunk by chunk, appended
    to ``out``: (records read, hash arrays, label-code arrays). ``recipe``: the source's view (its
    columns); ``at``: where its keys are; ``tag``: its name, put in each example's ``source``
    after hashing (so an example is the same example whichever source holds it); ``located``:
    the recipe whose keys locate a missing path."""
    from ftcli.data.read import iter_source

    d = recipe.data
    source = source_of(located or recipe, spec)
    files = _parallel_files(recipe, source)
    if files is not None:
        got = _read_parallel(out, recipe, files, spec, counts, names, at, tag)
        if got is not None:
            return got
    hashes, codes, n = [], [], 0
    classify = recipe.task == "classification"
    for records in iter_source(source, d, counts.notes):
        if not records:
            continue
        if not n:
            check_columns(recipe, records, spec, at)
        start = n
        try:
            if recipe.task in pairs.PAIR_TASKS:  # mapped, screened and cleaned by pairs.py
                examples = pairs.clean_chunk(recipe, records, n, counts, spec)
            else:
                examples = to_examples(recipe, records, start=n)
        except DataError as exc:  # "record 7: ..." needs the file it is in
            raise DataError(f"{spec}: {exc.message}", hint=exc.hint) from None
        if recipe.task in pairs.PAIR_TASKS:
            n += len(records)
        else:
            n += len(examples)
            examples = _strip_and_drop(examples, d, counts)
        hashes.append(_hashes(examples))
        if classify:
            codes.append(
                np.array([names.setdefault(e["label"], len(names)) for e in examples], np.int32)
            )
        if tag is not None:
            examples = [{**e, "source": tag} for e in examples]
        if recipe.task in pairs.PAIR_TASKS:  # a message prompt has a column of its own
            examples = [pairs.to_arrow_row(e) for e in examples]
        try:
            out.rows(examples)
        except UnicodeEncodeError:  # Arrow holds utf-8 only
            raise _lone_surrogate(spec, records, start) from None
    if not n:
        check_columns(recipe, [], spec, at)
    counts.read += n
    return n, hashes, codes


def _lone_surrogate(spec: str, records: list, start: int) -> DataError:
    """The error for the chunk's first record holding a lone surrogate (a JSON escape such as
    ``\\ud800`` with no pair): no utf-8 text, so no Arrow file, can hold it. ``start``: the
    records of the source before the chunk."""
    at = ""
    for i, r in enumerate(records):
        try:
            json.dumps(r, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            at = f"record {start + i + 1}: "
            break
    return DataError(
        f"{spec}: {at}a lone surrogate escape (such as \\ud800 with no low half after it) is "
        "not text",
        hint="fix the record where the file was written (a string cut inside an emoji's "
        "escape pair), or remove it",
    )


# A local, uncompressed utf-8 jsonl source from this size on is read, mapped, cleaned and hashed
# by data.num_proc worker processes (READ_BYTES of it, cut at a line end, per task); anything
# else, and smaller files, in this process. The result is the same either way.
PARALLEL_READ_FROM = 16 << 20
READ_BYTES = 8 << 20


def _line_ranges(path: str, step: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges covering the file, about ``step`` bytes each, each ending just
    after a newline (or at the end of the file)."""
    import os

    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + step < size:
            f.seek(cuts[-1] + step)
            at = None
            while at is None:
                buf = f.read(1 << 16)
                if not buf:
                    break
                i = buf.find(b"\n")
                if i >= 0:
                    at = f.tell() - len(buf) + i + 1
            if at is None or at >= size:
                break
            cuts.append(at)
    return list(zip(cuts, [*cuts[1:], size], strict=True))


def _parallel_files(recipe: Recipe, source) -> list[str] | None:
    """The source's files when the parallel reader may take them (``PARALLEL_READ_FROM``),
    else None. Preference data stays in this process: its bad rows are counted and the first one
    named by its record number as they stream."""
    from ftcli.data.pool import num_procs
    from ftcli.data.read import _format_of

    d = recipe.data
    if recipe.task in pairs.PAIR_TASKS or source.kind != "files" or num_procs(recipe) < 2:
        return None
    if d.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        return None
    files = list(source.paths)
    try:
        if any(_format_of(f, d.format) != "jsonl" or f.endswith((".gz", ".bz2")) for f in files):
            return None
        size = sum(Path(f).stat().st_size for f in files)
    except (DataError, OSError):  # the serial reader says what is wrong
        return None
    return files if size >= PARALLEL_READ_FROM else None


def _read_task(task: tuple, recipe: Recipe, tag: str | None, schema):
    """One byte range of a jsonl file, as ``_read_into`` does a chunk: records decoded, mapped,
    stripped and dropped, hashed, and written to their own Arrow file. Returns (the file, records
    read, empties, hashes, labels or None, the first record or None), or None when anything in
    the range fails: the caller then reads the whole source in its own process, whose error
    names the file and the record."""
    path, start, stop, out = task
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(stop - start)
    from ftcli.data.plain_chat import read_range

    plain = read_range(raw, start, recipe, schema, tag)  # plain chat, read by Arrow
    if plain is not None:
        table, n, empty, digests, first = plain
        with TableWriter(Path(out), schema) as w:
            w.table(table)
        return out, n, empty, np.frombuffer(digests, dtype=HASH).copy(), None, first
    try:
        text = raw.decode("utf-8-sig" if start == 0 else "utf-8")
        if "\r" in text:  # universal newlines, as the serial reader's text stream reads them
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        records = []
        for line in text.split("\n"):
            if line.strip():
                r = json.loads(line)
                records.append(r if isinstance(r, dict) else {"text": r})
        counts = CleanCounts()
        examples = _strip_and_drop(to_examples(recipe, records), recipe.data, counts)
    except Exception:  # noqa: BLE001 (the serial reader raises it again, located)
        return None
    hashes = _hashes(examples)
    labels = [e["label"] for e in examples] if recipe.task == "classification" else None
    if tag is not None:
        examples = [{**e, "source": tag} for e in examples]
    with TableWriter(Path(out), schema) as w:
        for s in range(0, len(examples), CHUNK):
            try:
                w.rows(examples[s : s + CHUNK])
            except UnicodeEncodeError:  # a lone surrogate: the serial reader names the record
                return None
    return out, len(records), counts.empty, hashes, labels, records[0] if records else None


def _start_read(
    recipe: Recipe, files: list[str], tag: str | None, schema, work: Path, stack
) -> tuple:
    """The worker processes started on the files' byte ranges, writing into the folder ``work``
    (both gone when ``stack`` closes); returns the results' iterator, in range order. The
    workers start at once; the results wait in the pool until read."""
    import shutil
    from functools import partial

    from ftcli.data.pool import num_procs, workers

    work.mkdir(parents=True, exist_ok=True)
    stack.callback(shutil.rmtree, work, True)
    ranges = [(f, a, b) for f in files for a, b in _line_ranges(f, READ_BYTES)]
    tasks = [(f, a, b, str(work / f"part-{i:05d}.arrow")) for i, (f, a, b) in enumerate(ranges)]
    fn = partial(_read_task, recipe=recipe, tag=tag, schema=schema)
    imap = stack.enter_context(workers(fn, min(num_procs(recipe), len(tasks))))
    return imap(tasks)


# reads started ahead (``read_ahead``), by what decides their output: the files, the task and
# the data section
_AHEAD: dict[tuple, tuple] = {}  # key -> (its ExitStack, the results' iterator)


def _ahead_key(recipe: Recipe, files: list[str], tag: str | None) -> tuple:
    return (tuple(files), tag, recipe.task, recipe.data.model_dump_json())


@contextlib.contextmanager
def read_ahead(recipe: Recipe, folder: Path):
    """Start reading the recipe's data source in the worker processes now, so that what the
    caller does next in this process (loading the tokenizer: seconds, on one core) runs while
    they read; ``prepare`` inside the block takes their results. Only for the one big jsonl
    source ``_read_parallel`` reads (no mixture, no hub id: nothing is asked of the hub twice).
    The workers write into a new folder in ``folder`` (an existing one, on the disk the prepared
    data goes to); whatever is not taken is stopped and removed when the block ends."""
    import shutil
    import tempfile

    stack = contextlib.ExitStack()
    key = None
    try:
        d = recipe.data
        if d.path and not d.sources and not d.streaming and not is_hub_spec(d.path):
            try:
                files = _parallel_files(recipe, source_of(recipe, d.path))
            except FtcliError:  # prepare says what is wrong, in its turn
                files = None
            if files is not None:
                key = _ahead_key(recipe, files, None)
                work = Path(tempfile.mkdtemp(prefix=".ftcli-read-", dir=folder)) / "parts"
                stack.callback(shutil.rmtree, work.parent, True)
                _AHEAD[key] = (
                    stack,
                    _start_read(recipe, files, None, schema_of(recipe), work, stack),
                )
        yield
    finally:
        if key is not None:
            _AHEAD.pop(key, None)
        stack.close()


def _read_parallel(
    out: TableWriter,
    recipe: Recipe,
    files: list[str],
    spec: str,
    counts: CleanCounts,
    names: dict[str, int],
    at: str,
    tag: str | None,
) -> tuple[int, list, list] | None:
    """``_read_into`` over byte ranges of the files in worker processes (started here, or by
    ``read_ahead``); None (nothing written) when a range fails, for the serial reader to say
    why."""
    import pyarrow as pa

    ahead = _AHEAD.pop(_ahead_key(recipe, files, tag), None)
    with contextlib.ExitStack() as stack:
        if ahead is not None:
            stack.push(ahead[0])  # its pool and folder go when this read ends
        if ahead is not None and out.schema.equals(schema_of(recipe)):
            results_of = ahead[1]
        else:
            work = out.path.parent / f".{out.path.name}.read"
            results_of = _start_read(recipe, files, tag, out.schema, work, stack)
        results = []
        for got in results_of:
            if got is None:
                return None
            results.append(got)
        first = next((r[5] for r in results if r[5] is not None), None)
        check_columns(recipe, [first] if first is not None else [], spec, at)
        hashes, codes = [], []
        for part, _, empty, h, labels, _ in results:
            counts.empty += empty
            hashes.append(h)
            if labels is not None:
                codes.append(np.array([names.setdefault(x, len(names)) for x in labels], np.int32))
            with pa.OSFile(part) as f:  # read, not mapped: not this process's pages
                for batch in pa.ipc.open_stream(f):
                    out.table(batch)
        n = sum(r[1] for r in results)
        counts.read += n
        return n, hashes, codes


def _load_source(
    recipe: Recipe, spec: str, counts: CleanCounts, path: Path, names: dict[str, int], keep
) -> _Source:
    """``load_examples`` streamed: records are read, mapped and cleaned chunk by chunk into an
    Arrow file at ``path``; dedupe works on the hashes, keeping each example's first copy."""
    d = recipe.data
    classify = recipe.task == "classification"
    with TableWriter(path, schema_of(recipe)) as out:
        _, hashes, codes = _read_into(out, recipe, spec, counts, names)
    h = np.concatenate(hashes) if hashes else np.zeros(0, HASH)
    idx = np.arange(len(h))
    if d.clean.dedupe and len(h):
        idx = np.sort(np.unique(h, return_index=True)[1])
        counts.duplicate += len(h) - len(idx)
    counts.kept += len(idx)
    c = (np.concatenate(codes) if codes else np.zeros(0, np.int32)) if classify else None
    return _Source(Rows.open(path, keep), idx, h, c)


def _filter_label_codes(
    recipe: Recipe, src: _Source, names: dict[str, int], counts: CleanCounts
) -> list[str]:
    """The labels to keep (data.labels, else every label found; at least 2, at most 1,000), and
    ``src.kept`` narrowed to them, on label codes."""
    by_code = list(names)
    tally = np.bincount(src.codes[src.kept], minlength=len(by_code))
    present = collections.Counter({by_code[c]: int(k) for c, k in enumerate(tally) if k})
    wanted = recipe.data.labels
    if wanted:
        missing = [lab for lab in wanted if lab not in present]
        if missing:
            hint = ", ".join(f"{lab!r} ({n})" for lab, n in present.most_common(20))
            raise RecipeError(
                [
                    recipe.problem(
                        "data.labels",
                        f"label(s) {', '.join(map(repr, missing))} never occur in the data",
                        f"labels found: {hint}",
                    )
                ]
            )
        before = len(src.kept)
        src.kept = _with_labels(src, wanted, names)
        counts.unlisted_label += before - len(src.kept)
        return list(wanted)
    labels = sorted(present)
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least 2 labels; the data has {len(labels)}: {labels}",
            hint="check data.label_column",
        )
    if len(labels) > 1000:
        raise DataError(
            f"{len(labels)} distinct labels: {recipe.data.label_col!r} does not look like a label column",
            hint="check data.label_column, or list the labels to keep in data.labels",
        )
    return labels


def _with_labels(src: _Source, labels: list[str], names: dict[str, int]) -> np.ndarray:
    wanted = np.array([names[lab] for lab in labels if lab in names], np.int32)
    return src.kept[np.isin(src.codes[src.kept], wanted)]


def _without(src: _Source, idx: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``idx`` less the rows whose example is among the ``held`` hashes."""
    if not len(held) or not len(idx):
        return idx
    return idx[~np.isin(src.hashes[idx], held)]


SPLIT_CHUNK = 10_000  # rows taken at a time from the source into a split's file


def _write_split(src: _Source, idx, path: Path, keep) -> Rows:
    """The rows ``idx`` of ``src``, in that order, into their own Arrow file, a chunk at a time;
    a source file is read through ``sparse_map``, its pages let go after each record batch."""
    idx = np.asarray(idx, dtype=np.int64)
    with contextlib.ExitStack() as stack:
        table, drop = src.rows.table, None
        if src.rows.path is not None:
            table, drop = stack.enter_context(sparse_map(src.rows.path))
        with TableWriter(path, table.schema) as out:
            for s in range(0, len(idx), SPLIT_CHUNK):
                out.table(take_rows(table, idx[s : s + SPLIT_CHUNK], drop))
    return Rows.open(path, keep)


def _label_counts(rows) -> dict[str, int]:
    """label -> count, in the order labels first occur (what Counter over the rows gives)."""
    if isinstance(rows, Rows):
        import pyarrow.compute as pc

        vc = pc.value_counts(rows.table.column("label")).to_pylist()
        return {v["values"]: v["counts"] for v in vc}
    return dict(collections.Counter(e["label"] for e in rows))


def prepare(recipe: Recipe, folder: Path | None = None) -> PreparedData:
    """Read, clean and split the data (``save_prepared`` writes it to the run's data/ folder).

    Records stream through in chunks into Arrow files (in ``folder`` as ``<split>.examples.arrow``,
    else a temporary folder that lives as long as the splits); cleaning, label filtering, overlap
    removal and splitting work on row indices, labels and example hashes, never on the whole
    corpus as Python objects. The splits are exactly those of the list-based implementation."""
    d = recipe.data
    keep = None
    if folder is None:
        keep = Scratch()
        folder = keep.path
    work = Path(folder) / ".sources"
    work.mkdir(parents=True, exist_ok=True)
    try:
        if d.sources:
            return _prepare_mixture(recipe, d, Path(folder), work, keep)
        return _prepare(recipe, d, Path(folder), work, keep)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # mapped files stay readable until unmapped


def _prepare(recipe: Recipe, d: DataSpec, folder: Path, work: Path, keep) -> PreparedData:
    counts = CleanCounts()
    names: dict[str, int] = {}  # label -> code, in the order labels first occur
    main = _load_source(recipe, d.path, counts, work / "path.arrow", names, keep)
    explicit = {
        name: _load_source(recipe, p, counts, work / f"{name}.arrow", names, keep)
        for name, p in (("validation", d.validation_path), ("test", d.test_path))
        if p
    }
    labels = None
    if recipe.task == "classification":
        labels = _filter_label_codes(recipe, main, names, counts)
        for src in explicit.values():
            src.kept = _with_labels(src, labels, names)
    if not len(main.kept):
        bad = "".join(f", {n} {k.replace('_', ' ')}" for k, n in counts.bad.items() if n)
        first = f"; the first bad row: {counts.first_bad}" if counts.first_bad else ""
        raise DataError(
            f"no examples left in {d.path} after cleaning "
            f"({counts.read} read, {counts.empty} empty, {counts.duplicate} duplicates{bad})"
            + first,
            hint=(
                "unpaired (KTO) rows train only with task preference and preference.loss: kto "
                "(--set preference.loss=kto); docs/preference.md describes the layouts"
                if counts.bad.get("unpaired")
                else "docs/preference.md describes the pair layouts"
            )
            if first
            else None,
        )

    # No example may sit in two splits: explicit files win over the training pool.
    overlap = 0
    held = np.zeros(0, HASH)
    for name in ("test", "validation"):
        if name in explicit:
            src = explicit[name]
            before = len(src.kept)
            src.kept = _without(src, src.kept, held)
            overlap += before - len(src.kept)
            held = np.concatenate([held, src.hashes[src.kept]])
    before = len(main.kept)
    main.kept = _without(main, main.kept, held)
    overlap += before - len(main.kept)

    def labels_of(idx):
        if labels is None:
            return None
        by_code = list(names)
        return [by_code[c] for c in main.codes[idx]]

    seed, strat = d.split.seed, d.split.stratify
    pool = main.kept
    if "test" in explicit:
        test_src, test = explicit["test"], explicit["test"].kept
    else:
        pool, test = _split_off(
            pool, labels_of(pool), d.split.test, seed, strat, "test", d.split.test
        )
        test_src = main
    if "validation" in explicit:
        val_src, validation = explicit["validation"], explicit["validation"].kept
    else:
        # fraction of the whole, not of what is left after the test split
        frac = d.split.validation / max(1e-9, 1 - (0 if "test" in explicit else d.split.test))
        pool, validation = _split_off(
            pool,
            labels_of(pool),
            min(frac, 0.95),
            seed + 1,
            strat,
            "validation",
            d.split.validation,
        )
        val_src = main
    # Whatever clean.dedupe says, the sealed test split shares no example with train or
    # validation, nor validation with train: copies left in the pool are dropped and counted.
    test_keys = test_src.hashes[test]
    before = len(validation)
    validation = _without(val_src, validation, test_keys)
    overlap += before - len(validation)
    held = np.concatenate([test_keys, val_src.hashes[validation]])
    before = len(pool)
    pool = _without(main, pool, held)
    overlap += before - len(pool)
    chosen = {
        "train": (main, _cap(pool, d.max_train_examples, seed)),
        "validation": (val_src, _cap(validation, d.max_validation_examples, seed)),
        "test": (test_src, _cap(test, d.max_test_examples, seed)),
    }
    return _finish(recipe, folder, keep, chosen, labels, names, main, counts, overlap)


def _finish(
    recipe: Recipe,
    folder: Path,
    keep,
    chosen: dict,
    labels: list[str] | None,
    names: dict[str, int],
    main: _Source,
    counts: CleanCounts,
    overlap: int,
    mixture: dict | None = None,
) -> PreparedData:
    """The chosen rows of each split checked, written to their Arrow files, augmented, counted."""
    d = recipe.data
    if not len(chosen["train"][1]):
        raise DataError(
            "the training split is empty", hint="add data, or lower data.split fractions"
        )
    if not len(chosen["test"][1]):
        raise DataError(
            "the test split is empty: there is nothing to evaluate on",
            hint="set data.split.test above 0, or data.test_path",
        )
    if labels:
        have = set(main.codes[chosen["train"][1]].tolist())
        missing = [lab for lab in labels if names[lab] not in have]
        if missing:
            raise DataError(
                f"label(s) {missing} have no training example after splitting",
                hint="add examples of them, or drop them with data.labels",
            )
    splits: dict = {
        name: _write_split(src, idx, folder / f"{name}.examples.arrow", keep)
        for name, (src, idx) in chosen.items()
    }

    augmented = None
    if d.augment is not None:  # after the split, on train only: validation and test stay as read
        from ftcli.data.augment import augment_train

        splits["train"], augmented = augment_train(list(splits["train"]), d.augment, recipe.task)
    stats = {
        "source": d.where,
        "read": counts.read,
        "dropped": {
            "unlisted_label": counts.unlisted_label,
            "empty": counts.empty,
            "duplicate": counts.duplicate,
            "shared_between_splits": overlap,
            **(pairs.dropped(counts) if recipe.task in pairs.PAIR_TASKS else {}),
        },
        "sizes": {k: len(v) for k, v in splits.items()},
    }
    if counts.notes:
        stats["notes"] = counts.notes
    if augmented is not None:
        stats["augmented"] = augmented
    if labels:
        stats["label_counts"] = {k: _label_counts(v) for k, v in splits.items()}
    if d.style != "text" and recipe.task == "causal_lm":
        stats["layout"] = d.style
    if recipe.task in pairs.PAIR_TASKS:
        stats["layout"] = pairs.layout_of(splits.values())
    if mixture is not None:
        stats["sources"] = mixture_counts(mixture, splits)
    return PreparedData(splits, labels, stats)


# --------------------------------------------------------------------------- mixtures


def source_views(recipe: Recipe) -> list[tuple[str, Recipe, str]]:
    """(name, the recipe as if the source were its one data.path, where its keys are) for each
    data.sources entry."""
    from ftcli.recipe.schema import source_names

    d = recipe.data
    return [
        (name, recipe.model_copy(update={"data": d.for_source(s)}), f"data.sources.{i}")
        for i, (s, name) in enumerate(zip(d.sources, source_names(d.sources), strict=True))
    ]


def _source_counts(rows) -> dict[str, int]:
    """source name -> examples, in a split (the ``source`` column, or each dict's key)."""
    if isinstance(rows, Rows):
        import pyarrow.compute as pc

        vc = pc.value_counts(rows.table.column("source")).to_pylist()
        return {v["values"]: v["counts"] for v in vc}
    return dict(collections.Counter(e.get("source") for e in rows))


def mixture_counts(mixture: dict, splits: dict) -> dict:
    """data.json's ``sources``: per source what was read and kept, and its examples per split."""
    per_split = {k: _source_counts(v) for k, v in splits.items()}
    return {
        name: {**info, "sizes": {k: per_split[k].get(name, 0) for k in splits}}
        for name, info in mixture.items()
    }


def _prepare_mixture(recipe: Recipe, d: DataSpec, folder: Path, work: Path, keep) -> PreparedData:
    """``_prepare`` for data.sources: every source read with its own columns into one Arrow file
    (a ``source`` column naming each example's), cleaned and deduplicated together (an example
    two sources hold is kept once, in the first), then each source split on its own (stratified,
    as one source is), so each has its sealed test slice; the training split sampled by weight
    (``data.mixture``); validation and test keep every source's held-out examples."""
    import pyarrow as pa

    from ftcli.data.mixture import interleave, train_rows

    views = source_views(recipe)
    counts = CleanCounts()
    names: dict[str, int] = {}
    schema = schema_of(views[0][1]).append(pa.field("source", pa.string()))
    mixture: dict[str, dict] = {}
    hashes, codes, origin = [], [], []
    path = work / "sources.arrow"
    with TableWriter(path, schema) as out:
        for j, ((name, view, at), spec) in enumerate(zip(views, d.sources, strict=True)):
            mine = CleanCounts(notes=counts.notes)
            _, h, c = _read_into(out, view, spec.path, mine, names, at, name, recipe)
            n = sum(len(x) for x in h)
            hashes += h
            codes += c
            origin.append(np.full(n, j, np.int32))
            counts.read += mine.read
            counts.empty += mine.empty
            mixture[name] = {"path": spec.path, "read": mine.read, "empty": mine.empty}
            if recipe.task == "causal_lm":
                mixture[name]["layout"] = view.data.style
            for key in ("weight", "max_examples"):
                if getattr(spec, key) is not None:
                    mixture[name][key] = getattr(spec, key)
    h = np.concatenate(hashes) if hashes else np.zeros(0, HASH)
    src_of = np.concatenate(origin) if origin else np.zeros(0, np.int32)
    idx = np.arange(len(h))
    if d.clean.dedupe and len(h):  # the first copy wins, across sources too
        idx = np.sort(np.unique(h, return_index=True)[1])
        counts.duplicate += len(h) - len(idx)
    counts.kept += len(idx)
    classify = recipe.task == "classification"
    c = (np.concatenate(codes) if codes else np.zeros(0, np.int32)) if classify else None
    main = _Source(Rows.open(path, keep), idx, h, c)
    for j, name in enumerate(mixture):
        kept = int(np.count_nonzero(src_of[idx] == j))
        mixture[name]["duplicate"] = int(np.count_nonzero(src_of == j)) - kept
        mixture[name]["kept"] = kept
    labels = _filter_label_codes(recipe, main, names, counts) if classify else None

    def labels_of(rows):
        if labels is None:
            return None
        by_code = list(names)
        return [by_code[k] for k in main.codes[rows]]

    seed, strat = d.split.seed, d.split.stratify
    frac = d.split.validation / max(1e-9, 1 - d.split.test)
    pools, vals, tests = [], [], []
    for j, name in enumerate(mixture):
        rows = main.kept[src_of[main.kept] == j]
        if not len(rows):
            raise DataError(
                f"data source {name!r} ({mixture[name]['path']}): no examples left after "
                f"cleaning ({mixture[name]['read']} read)",
                hint="check its columns and labels, or remove it from data.sources",
            )
        try:
            pool, test = _split_off(
                rows, labels_of(rows), d.split.test, seed, strat, "test", d.split.test
            )
            pool, val = _split_off(
                pool,
                labels_of(pool),
                min(frac, 0.95),
                seed + 1,
                strat,
                "validation",
                d.split.validation,
            )
        except DataError as exc:
            raise DataError(f"data source {name!r}: {exc.message}", hint=exc.hint) from None
        pools.append(pool)
        vals.append(val)
        tests.append(test)
    # no example in two splits, whichever sources hold it (dedupe off): as for one source
    test = np.concatenate(tests)
    validation = np.concatenate(vals)
    overlap = 0
    before = len(validation)
    validation = _without(main, validation, main.hashes[test])
    overlap += before - len(validation)
    held = np.concatenate([main.hashes[test], main.hashes[validation]])
    for j in range(len(pools)):
        before = len(pools[j])
        pools[j] = _without(main, pools[j], held)
        overlap += before - len(pools[j])
    specs = d.sources
    parts, repeated = train_rows(
        pools,
        [s.weight for s in specs],
        [s.max_examples for s in specs],
        d.max_train_examples,
        seed,
    )
    for name, r in zip(mixture, repeated, strict=True):
        if r:
            mixture[name]["repeated"] = r
    train = interleave(parts, seed)
    if not any(s.weight is not None for s in specs):
        train = _cap(train, d.max_train_examples, seed)
    chosen = {
        "train": (main, train),
        "validation": (main, _cap(validation, d.max_validation_examples, seed)),
        "test": (main, _cap(test, d.max_test_examples, seed)),
    }
    return _finish(recipe, folder, keep, chosen, labels, names, main, counts, overlap, mixture)


# --------------------------------------------------------------------------- the run's data/ folder

# A training split up to this many examples is written as train.jsonl, as every split used to be
# (a file to open and grep); a bigger one stays Arrow (train.arrow), read memory-mapped.
TRAIN_JSONL_MAX = 50_000


def split_digest(rows) -> str:
    """sha256 of a split as the JSON-lines text ftcli writes, whatever holds it (data.json's
    ``sha256``: a resumed run checks its splits against these)."""
    return jsonl_digest(rows)


def _write_jsonl_stream(path: Path, rows) -> None:
    """``write_jsonl`` a row at a time: never half-written, never the whole text in memory."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def save_prepared(prepared: PreparedData, data_dir: Path) -> PreparedData:
    """Write the splits, labels and data.json; returns the record with the splits' digests added.

    validation.jsonl and test.jsonl are always text; the training split is train.jsonl up to
    TRAIN_JSONL_MAX examples, else train.arrow (an Arrow IPC stream: ``datasets.Dataset.from_file``
    or ``pyarrow.ipc.open_stream`` reads it)."""
    import shutil

    data_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, rows in prepared.splits.items():
        digests[name] = split_digest(rows)
        arrow = data_dir / f"{name}.arrow"
        if name == "train" and isinstance(rows, Rows) and len(rows) > TRAIN_JSONL_MAX:
            with atomic_file(arrow) as tmp:
                if rows.path is not None:
                    shutil.copyfile(rows.path, tmp)
                else:
                    with TableWriter(tmp, rows.table.schema) as out:
                        out.table(rows.table)
            (data_dir / f"{name}.jsonl").unlink(missing_ok=True)
        else:
            _write_jsonl_stream(data_dir / f"{name}.jsonl", rows)
            arrow.unlink(missing_ok=True)
    if prepared.labels is not None:
        atomic_write_text(data_dir / "labels.json", json.dumps(prepared.labels, indent=2) + "\n")
    stats = {**prepared.stats, "sha256": digests}
    atomic_write_text(data_dir / "data.json", json.dumps(stats, indent=2) + "\n")
    return replace(prepared, stats=stats)


def load_prepared(data_dir: Path) -> PreparedData:
    """The splits a run wrote, so evaluation uses exactly the same examples: validation and test
    from their jsonl files, train from train.arrow (memory-mapped) or train.jsonl (every run
    folder written before Arrow, and small runs since)."""
    if not (data_dir / "test.jsonl").is_file():
        raise DataError(
            f"{data_dir} holds no prepared splits (test.jsonl)", hint="run `ftcli train` first"
        )
    splits: dict = {}
    for name in SPLITS:
        arrow = data_dir / f"{name}.arrow"
        if arrow.is_file():
            try:
                splits[name] = Rows.open(arrow)
            except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
                raise DataError(
                    f"{arrow}: cannot read it as Arrow ({exc})",
                    hint="the file is damaged: start the run again (--force)",
                ) from None
        else:
            splits[name] = read_jsonl(data_dir / f"{name}.jsonl")
    labels = read_json(data_dir / "labels.json") if (data_dir / "labels.json").exists() else None
    stats = read_json(data_dir / "data.json") if (data_dir / "data.json").exists() else {}
    return PreparedData(splits, labels, stats)
