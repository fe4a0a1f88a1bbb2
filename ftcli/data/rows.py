"""Sequences of row dicts over Arrow tables: the prepared splits and tokenized features live in
Arrow files, memory-mapped, and are decoded into Python only a row (or a batch) at a time.

``Rows`` is what ``PreparedData.splits[name]`` holds for data ftcli prepared; ``Features`` is
``Tokenized.features`` (with ``.lengths`` read from a column). Both behave as read-only lists:
``len``, ``[i]``, ``[a:b]`` (a list), iteration, ``==`` against a list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from ftcli.data.messages import without_nulls

BATCH = 1024  # rows decoded at a time when iterating

# Schema metadata of a table whose rows come in several shapes (preference pairs beside KTO rows,
# a prompt as text or as messages): each row is decoded without its null columns, and the columns
# this JSON mapping names are renamed (``{"prompt_messages": "prompt"}``).
SPARSE = b"ftcli.sparse"
# the columns of preference features, one row per pair (ftcli/data/pairs.py writes them)
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


class Scratch:
    """A temporary folder that lives as long as the views over its files (then it is removed)."""

    def __init__(self, prefix: str = "ftcli-data-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._done = weakref.finalize(self, shutil.rmtree, str(self.path), True)


def take_rows(table: pa.Table, indices, after_batch: Callable[[], None] | None = None) -> pa.Table:
    """``table.take(indices)`` that reads only the record batches holding those rows;
    ``after_batch`` is called after the rows of each batch are copied out (``sparse_map``'s
    ``drop``: a memory-mapped file's pages are let go batch by batch).

    Arrow's own ``take`` on a table of many chunks with list or struct columns first joins the
    chunks: on a memory-mapped file that copies (and pages in) the whole column for every batch
    of a few rows (0.034 vs 0.004 s for 8 rows of 19,600 tokenized conversations, and a copy the
    size of the split held while it runs)."""
    import numpy as np

    idx = np.asarray(indices, dtype=np.int64)
    batches = table.to_batches()
    if len(batches) <= 1 or not len(idx):
        return table.take(pa.array(idx, type=pa.int64()))
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    if idx.min() < 0 or idx.max() >= starts[-1]:
        raise IndexError(f"row index out of range for {starts[-1]} rows")
    chunk = np.searchsorted(starts, idx, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    grouped, of = idx[order], chunk[order]
    pieces = []
    for c in np.unique(of):
        rows = grouped[of == c] - starts[c]
        pieces.append(batches[c].take(pa.array(rows, type=pa.int64())))
        if after_batch is not None:
            after_batch()
    joined = pa.Table.from_batches(pieces, schema=table.schema).combine_chunks()
    back = np.empty(len(idx), dtype=np.int64)
    back[order] = np.arange(len(idx))  # joined holds the rows grouped by chunk: put them back
    return joined.take(pa.array(back, type=pa.int64()))


def open_table(path: Path) -> pa.Table:
    """An Arrow IPC stream file, memory-mapped (no copy into memory)."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


@contextlib.contextmanager
def sparse_map(path: Path) -> Iterator[tuple[pa.Table, Callable[[], None]]]:
    """(table, drop) of an Arrow IPC stream file memory-mapped for scattered reads: ``drop()``
    lets go of the pages this process has touched in it so far (they stay in the page cache, and
    come back when read again). Rows taken at random touch every page of a file (the kernel maps
    64 KiB around each page read), so a split of 200k conversations taken from its 650 MiB
    source held all of it; dropped after each record batch's rows, about one batch."""
    import mmap

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    table = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mm))).read_all()
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        yield table, lambda: mm.madvise(mmap.MADV_DONTNEED)
    else:
        yield table, lambda: None


def _column(values: list, typ: pa.DataType) -> pa.Array:
    """One column of rows as Arrow. A list of flat structs of strings (chat messages) is built
    from one list per field: 5.7x faster than converting each message dict (1.44 vs 0.25 s for
    20k conversations), the same array."""
    inner = typ.value_type if pa.types.is_list(typ) else None
    if (
        inner is not None
        and pa.types.is_struct(inner)
        and all(pa.types.is_string(f.type) for f in inner)
        and all(isinstance(v, list) for v in values)
        and all(isinstance(m, dict) for v in values for m in v)
    ):
        import numpy as np

        flat = [m for v in values for m in v]
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([len(v) for v in values], out=offsets[1:])
        fields = [pa.array([m.get(f.name) for m in flat], f.type) for f in inner]
        struct = pa.StructArray.from_arrays(fields, fields=list(inner))
        return pa.ListArray.from_arrays(pa.array(offsets), struct, type=typ)
    return pa.array(values, typ)


class TableWriter:
    """Record batches into an Arrow IPC stream file (the format ``datasets`` caches in, so
    ``datasets.Dataset.from_file`` opens it too)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def rows(self, rows: list[dict]) -> None:
        if rows:
            cols = [_column([r.get(f.name) for r in rows], f.type) for f in self.schema]
            self._writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))

    def table(self, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows:
            self._writer.write(table)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rich_messages(schema: pa.Schema) -> bool:
    """A ``messages`` column whose messages have fields beyond role and content (which a row's
    message may lack: null there)."""
    if "messages" not in schema.names:
        return False
    t = schema.field("messages").type
    return pa.types.is_list(t) and pa.types.is_struct(t.value_type) and t.value_type.num_fields > 2


class Rows(Sequence):
    """Read-only list of row dicts over an Arrow table; ``path``: the file it is mapped from."""

    def __init__(self, table: pa.Table, path: Path | None = None, keep=None):
        self.table = table
        self.path = Path(path) if path is not None else None
        self._keep = keep  # a Scratch folder holding ``path``: alive as long as this view

    @classmethod
    def open(cls, path: Path, keep=None):
        return cls(open_table(path), path, keep)

    def __len__(self) -> int:
        return self.table.num_rows

    def _decode(self, table) -> list[dict]:
        rows = table.to_pylist()
        meta = table.schema.metadata
        if meta and SPARSE in meta:
            names = json.loads(meta[SPARSE])
            rows = [{names.get(k, k): v for k, v in r.items() if v is not None} for r in rows]
        if _rich_messages(table.schema):  # each message without the fields it does not have
            for r in rows:
                r["messages"] = without_nulls(r["messages"])
        return rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self._decode(self.table.slice(start, max(0, stop - start)))
            return self.__getitems__(list(range(start, stop, step)))
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._decode(self.table.slice(i, 1))[0]

    def __getitems__(self, indices) -> list[dict]:
        """Several rows in one read (torch's DataLoader fetches a batch through this)."""
        if len(indices) == 0:
            return []
        return self._decode(take_rows(self.table, indices))

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches(max_chunksize=BATCH):
            yield from self._decode(batch)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other) -> list[dict]:
        return [*self, *other]

    def __radd__(self, other) -> list[dict]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows{f', {self.path}' if self.path else ''})"


class Features(Rows):
    """Tokenized features: rows {"input_ids", "attention_mask", "labels"} (the mask, all ones, is
    not stored), and ``lengths``: each example's number of tokens, from the ``length`` column.
    Preference pairs are rows of PAIR_COLUMNS (``length``: the longer side's); KTO rows add
    ``desirable``."""

    def _decode(self, table) -> list[dict]:
        if PAIR_COLUMNS[0] in table.column_names:  # preference or reward pairs
            cols = [table.column(c).to_pylist() for c in PAIR_COLUMNS]
            return [dict(zip(PAIR_COLUMNS, v, strict=True)) for v in zip(*cols, strict=True)]
        ids = table.column("input_ids").to_pylist()
        labels = table.column("labels").to_pylist()
        rows = [
            {"input_ids": x, "attention_mask": [1] * len(x), "labels": y}
            for x, y in zip(ids, labels, strict=True)
        ]
        if "doc" in table.column_names:  # long_documents windows: the document each reads
            for r, d in zip(rows, table.column("doc").to_pylist(), strict=True):
                r["doc"] = d
        if "desirable" in table.column_names:  # KTO rows: 1 desirable, 0 undesirable
            for r, d in zip(rows, table.column("desirable").to_pylist(), strict=True):
                r["desirable"] = d
        return rows

    @property
    def lengths(self):
        """numpy array of len(input_ids) per example (read from a column, no row decoding)."""
        cached = getattr(self, "_lengths", None)
        if cached is None:
            cached = self._lengths = self.table.column("length").to_numpy()
        return cached


class Reordered(Sequence):
    """``base`` seen through an index list, lazily (nothing is decoded until a row is asked for)."""

    def __init__(self, base: Sequence, order: Sequence[int]):
        self.base, self.order = base, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return take(self.base, list(self.order[i]))
        return self.base[self.order[i]]

    def __getitems__(self, indices) -> list:
        return take(self.base, [self.order[i] for i in indices])


def take(seq: Sequence, indices: Sequence[int]) -> list:
    """``[seq[i] for i in indices]``, in one read when ``seq`` is Arrow-backed."""
    getitems = getattr(seq, "__getitems__", None)
    return getitems(list(indices)) if getitems else [seq[i] for i in indices]


def lengths_of(features: Sequence) -> list[int]:
    """Each feature's number of tokens: the ``lengths`` column when there is one."""
    lengths = getattr(features, "lengths", None)
    if lengths is not None:
        return lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
    return [len(f["input_ids"]) for f in features]


def jsonl_digest(rows: Iterable[dict]) -> str:
    """sha256 of the rows as the JSON-lines text ftcli writes (``util.write_jsonl``), streamed."""
    h = hashlib.sha256()
    for r in rows:
        h.update((json.dumps(r, ensure_ascii=False) + "\n").encode())
    return h.hexdigest()
