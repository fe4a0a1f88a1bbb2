"""Reading data sources into records (dicts): hub datasets, local files in every format ftcli
knows (.jsonl .json .csv .tsv .parquet .txt .yml, also .gz/.bz2), folders of ``<label>/*.txt``.

Text is decoded with ``data.encoding``; when the default utf-8 fails, charset-normalizer detects
the encoding and the choice is reported (``notes``), never replaced silently.
"""

from __future__ import annotations

import bz2
import collections
import csv
import gzip
import io
import json
import zlib
from pathlib import Path

import yaml

from ftcli.errors import DataError
from ftcli.recipe import DataSpec
from ftcli.sources import DataSource

# What a .gz/.bz2 data file may decompress to: RATIO times its own size, at least FLOOR, never
# more than CEILING. Text compresses 3-10x; a "zip bomb" thousands of times. A bigger file that
# is honest data can be decompressed by hand: plain files have no cap.
DECOMPRESS_RATIO = 200
DECOMPRESS_FLOOR = 256 * 2**20
DECOMPRESS_CEILING = 4 * 2**30
_CHUNK = 2**20


def _mib(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def decompress_cap(compressed_size: int) -> int:
    """The most bytes a compressed data file of ``compressed_size`` bytes may decompress to."""
    return min(DECOMPRESS_CEILING, max(DECOMPRESS_FLOOR, DECOMPRESS_RATIO * compressed_size))


def _read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed (.gz/.bz2) in chunks up to ``decompress_cap``; a truncated
    or damaged archive, or one that expands past the cap, is a DataError."""
    try:
        opener = gzip.open if path.endswith(".gz") else bz2.open if path.endswith(".bz2") else None
        if opener is None:
            return Path(path).read_bytes()
        size = Path(path).stat().st_size
        cap = decompress_cap(size)
        out, total = [], 0
        with opener(path, "rb") as f:
            while chunk := f.read(min(_CHUNK, cap + 1 - total)):
                total += len(chunk)
                if total > cap:
                    raise DataError(
                        f"{path}: decompresses to more than {_mib(cap)}, the cap for a "
                        f"{size:,}-byte archive ({DECOMPRESS_RATIO}x its size, at least "
                        f"{_mib(DECOMPRESS_FLOOR)}, at most {_mib(DECOMPRESS_CEILING)})",
                        hint="if it is real data, decompress it yourself and point data.path at "
                        "the plain file (plain files have no cap)",
                    )
                out.append(chunk)
        return b"".join(out)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read or decompress it ({exc or type(exc).__name__})",
            hint="the file is damaged or truncated: copy or download it again",
        ) from None


def decode(path: str, raw: bytes, encoding: str = "utf-8", explicit: bool = True, notes=None):
    """``raw`` as text in ``encoding``. 'auto', or a default utf-8 that fails, detects the
    encoding (charset-normalizer) and appends what it chose to ``notes``."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    failed = None
    if encoding != "auto":
        try:
            return raw.decode(codec)
        except UnicodeDecodeError as exc:
            failed = exc
            if explicit:
                raise DataError(
                    f"{path}: not {encoding} text: byte 0x{raw[exc.start]:02x} at offset "
                    f"{exc.start}{' (after decompression)' if path.endswith(('.gz', '.bz2')) else ''}"
                    " cannot be decoded",
                    hint="set data.encoding to the file's encoding (e.g. latin-1, cp1252), or "
                    "data.encoding: auto to detect it",
                ) from None
    best = _detect(raw)
    if best is None:
        where = f" (byte 0x{raw[failed.start]:02x} at offset {failed.start})" if failed else ""
        raise DataError(
            f"{path}: not {encoding if failed else 'text'}{where}, and no text encoding could be "
            "detected",
            hint="is it a text file? set data.encoding to its encoding (e.g. latin-1)",
        )
    if notes is not None:
        why = (
            f"not utf-8 (byte 0x{raw[failed.start]:02x} at offset {failed.start})"
            if failed
            else "data.encoding: auto"
        )
        notes.append(
            f"{path}: {why}; decoded as {best} (detected by charset-normalizer); "
            f"set data.encoding: {best} to say so"
        )
    return raw.decode(best)


# Among equally plausible detections (short texts tie often: cp1250 and cp1252 decode French
# alike), the encoding most files in the wild use wins.
_COMMON = ("utf_8", "cp1252", "latin_1", "iso8859_15", "utf_16", "cp1251", "cp1250")


def _detect(raw: bytes) -> str | None:
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw)) if raw else []
    if not matches:
        return None
    chaos = min(m.chaos for m in matches)
    tied = [m for m in matches if m.chaos == chaos]
    coherence = max(m.coherence for m in tied)
    tied = [m.encoding for m in tied if m.coherence == coherence]
    return min(tied, key=lambda e: _COMMON.index(e) if e in _COMMON else len(_COMMON))


def _format_of(path: str, declared: str) -> str:
    if declared not in ("auto", "folder"):
        return declared
    name = path.lower()
    for comp in (".gz", ".bz2"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    suffix = name.rsplit(".", 1)[-1] if "." in Path(name).name else ""
    known = {
        "csv": "csv",
        "tsv": "tsv",
        "json": "json",
        "jsonl": "jsonl",
        "ndjson": "jsonl",
        "parquet": "parquet",
        "txt": "txt",
        "yml": "yaml",
        "yaml": "yaml",
    }
    if suffix not in known:
        raise DataError(
            f"{path}: cannot tell the data format from the name",
            hint="use .csv, .tsv, .json, .jsonl, .parquet, .txt or .yml (optionally .gz/.bz2), or set data.format",
        )
    return known[suffix]


# How many values YAML aliases (``*name``) may add to a data file beyond the ones written out:
# this many, or as many as are written, whichever is more. Aliases of aliases ("billion laughs")
# turn a few hundred bytes into billions of values, and ftcli walks every one of them.
MAX_ALIAS_VALUES = 100_000


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_yaml_expansion(path: str, root: yaml.Node) -> None:
    """Refuse a YAML document whose aliases expand it far past what is written, or that contains
    itself, before it is built: the expanded size of each shared node is counted once."""
    expanded: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in _yaml_children(node))
        elif key in on_path:
            raise DataError(
                f"{path}: a YAML alias refers to a value that contains it (line "
                f"{node.start_mark.line + 1}); data cannot contain itself",
                hint="write the records out instead of using &anchors / *aliases",
            )
        elif key not in expanded:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _yaml_children(node))
    written, total = len(expanded), expanded[id(root)]
    if total - written > max(MAX_ALIAS_VALUES, written):
        raise DataError(
            f"{path}: YAML aliases expand its {written:,} written values to {total:,}; ftcli "
            f"reads at most {max(MAX_ALIAS_VALUES, written):,} values added by aliases "
            "(aliases nested in aliases?)",
            hint="write the records out instead of using &anchors / *aliases",
        )


def _load_yaml(path: str, text: io.StringIO):
    """``yaml.safe_load``, but a document that aliases blow up is refused before it is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_expansion(path, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml_records(path: str, text: io.StringIO) -> list[dict]:
    """A YAML list of mappings, or chatterbot-corpus's ``conversations:`` lists (-> chat messages)."""
    doc = _load_yaml(path, text)
    if isinstance(doc, list):
        return [r if isinstance(r, dict) else {"text": r} for r in doc]
    if isinstance(doc, dict) and isinstance(doc.get("conversations"), list):
        topic = Path(path).name.split(".")[0]
        records = []
        for conv in doc["conversations"]:
            turns = [str(t) for t in conv] if isinstance(conv, list) else []
            if len(turns) % 2:  # a trailing question with no answer teaches nothing
                turns = turns[:-1]
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(turns)
            ]
            records.append({"messages": messages, "topic": topic})
        return records
    raise DataError(f"{path}: expected a YAML list of records or a 'conversations:' mapping")


def _check_csv_shape(path: str, text: str, sep: str) -> None:
    """Refuse what pandas would quietly repair: a header naming a column twice (read as
    ``text``, ``text.1``) and rows with more or fewer fields than the header (read as a shifted
    or missing label, reported later as the wrong problem). Blank lines are skipped, as pandas
    does."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # one huge cell is fine
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header: list[str] | None = None
    ragged: list[tuple[int, int]] = []
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1  # a quoted cell may span lines
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = row
                counts = collections.Counter(header)
                twice = [c for c, n in counts.items() if n > 1]
                if twice:
                    raise DataError(
                        f"{path}: the header names column(s) {', '.join(map(repr, twice))} more "
                        f"than once (read as {twice[0]!r}, '{twice[0]}.1', ...: one of them would "
                        "be used and the others ignored)",
                        hint="give every column in the first line its own name",
                    )
            elif len(row) != len(header):
                ragged.append((line, len(row)))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot read as CSV ({exc})") from None
    if ragged:
        shown = ", ".join(f"line {n} has {k}" for n, k in ragged[:5])
        more = f" and {len(ragged) - 5} more" if len(ragged) > 5 else ""
        raise DataError(
            f"{path}: {len(ragged)} row(s) do not have the header's {len(header)} fields: "
            f"{shown}{more}",
            hint='quote cells that contain the separator ("a, b"), and give every row one '
            "cell per column",
        )


def read_file(
    path: str, fmt: str = "auto", encoding: str = "utf-8", explicit: bool = True, notes=None
) -> list[dict]:
    """Read one data file into a list of records (dicts). ``explicit``: the recipe set the
    encoding (no detection fallback); ``notes`` collects what detection chose."""
    kind = _format_of(path, fmt)

    def _open_text(p: str) -> io.StringIO:
        return io.StringIO(decode(p, _read_bytes(p), encoding, explicit, notes), newline=None)

    try:
        if kind in ("csv", "tsv"):
            import pandas as pd

            # dtype=str + no NA parsing: an empty text cell stays "", not float NaN
            # (docs/traps.md#empty-text-cells-read-as-numbers)
            text = _open_text(path)
            _check_csv_shape(path, text.getvalue(), "\t" if kind == "tsv" else ",")
            df = pd.read_csv(
                text,
                sep="\t" if kind == "tsv" else ",",
                dtype=str,
                keep_default_na=False,
            )
            return df.to_dict(orient="records")
        if kind == "parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
        if kind == "jsonl":
            records = []
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise DataError(
                                f"{path}:{lineno}: not valid JSON ({exc.msg})"
                            ) from None
            return [r if isinstance(r, dict) else {"text": r} for r in records]
        if kind == "json":
            with _open_text(path) as f:
                doc = json.load(f)
            if isinstance(doc, dict):
                lists = [v for v in doc.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(
                        f"{path}: expected a JSON list of records (or one list inside an object)"
                    )
                doc = lists[0]
            if not isinstance(doc, list):
                raise DataError(
                    f"{path}: expected a JSON list of records, found a {type(doc).__name__}"
                )
            return [r if isinstance(r, dict) else {"text": r} for r in doc]
        if kind == "txt":
            with _open_text(path) as f:
                return [{"text": line.rstrip("\n")} for line in f if line.strip()]
        if kind == "yaml":
            return _read_yaml_records(path, _open_text(path))
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    except RecursionError:  # JSON nested thousands deep
        raise DataError(f"{path}: cannot read as {kind}: nested too deeply") from None
    raise DataError(f"{path}: unsupported format {kind!r}")


def _read_label_folder(folder: Path, spec: DataSpec, notes) -> list[dict]:
    """``<label>/*.txt``: one record per file, columns ``text`` and ``label`` (implied). The
    folder is one source: its encoding is detected once, over all its files."""
    explicit = "encoding" in spec.model_fields_set
    files = [
        (f, sub.name)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for f in sorted(sub.glob("*.txt"))
    ]
    raws = [_read_bytes(str(f)) for f, _ in files]
    encoding = spec.encoding
    if not explicit or encoding == "auto":
        try:
            for (f, _), raw in zip(files, raws, strict=True):
                decode(str(f), raw, encoding)
        except DataError:
            encoding = "auto"
        if encoding == "auto" and files:
            chosen = _detect(b"\n".join(raws))
            if chosen is None:
                raise DataError(
                    f"{folder}: the .txt files are not utf-8 and no text encoding could be "
                    "detected",
                    hint="set data.encoding to their encoding (e.g. latin-1)",
                )
            if notes is not None:
                notes.append(
                    f"{folder}: not utf-8; its files decoded as {chosen} (detected by "
                    f"charset-normalizer); set data.encoding: {chosen} to say so"
                )
            encoding = chosen
    return [
        {"text": decode(str(f), raw, encoding), "label": label}
        for (f, label), raw in zip(files, raws, strict=True)
    ]


def read_source(source: DataSource, spec: DataSpec, notes: list | None = None) -> list[dict]:
    """All records of a resolved data source; ``notes`` collects what encoding detection chose."""
    if source.kind == "hub":
        return _read_hub(source.hub_id, spec)
    explicit = "encoding" in spec.model_fields_set
    if source.kind == "folder":
        folder = Path(source.paths[0])
        if spec.format in ("auto", "folder") and any(p.is_dir() for p in folder.iterdir()):
            records = _read_label_folder(folder, spec, notes)
            if records:
                return records
            if not any(p.is_file() for p in folder.iterdir()):
                raise DataError(
                    f"data folder {folder}: its label folders hold no .txt files",
                    hint="a folder of <label>/*.txt files: one folder per label, one file per "
                    "example",
                )
        files = sorted(
            str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"data folder {folder} holds no files",
                hint="a folder of <label>/*.txt files, or data files",
            )
    else:
        files = list(source.paths)
    records = []
    for f in files:
        records.extend(read_file(f, spec.format, spec.encoding, explicit, notes))
    return records


# Records handed on at a time by ``iter_source``: big jsonl/parquet files and hub datasets stream
# through in chunks this size, never as one list.
CHUNK = 10_000


def _open_stream(path: str):
    """The file's bytes as a binary stream, decompressed (.gz/.bz2) with ``decompress_cap``."""
    opener = gzip.open if path.endswith(".gz") else bz2.open if path.endswith(".bz2") else None
    if opener is None:
        return open(path, "rb")
    return _Capped(opener(path, "rb"), path, decompress_cap(Path(path).stat().st_size))


class _Capped(io.RawIOBase):
    """A decompressing stream that refuses to expand past ``cap`` bytes (as ``_read_bytes``)."""

    def __init__(self, inner, path: str, cap: int):
        self.inner, self.path, self.cap, self.total = inner, path, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self.inner.read(min(len(b), _CHUNK))
        self.total += len(chunk)
        if self.total > self.cap:
            size = Path(self.path).stat().st_size
            raise DataError(
                f"{self.path}: decompresses to more than {_mib(self.cap)}, the cap for a "
                f"{size:,}-byte archive ({DECOMPRESS_RATIO}x its size, at least "
                f"{_mib(DECOMPRESS_FLOOR)}, at most {_mib(DECOMPRESS_CEILING)})",
                hint="if it is real data, decompress it yourself and point data.path at "
                "the plain file (plain files have no cap)",
            )
        b[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.inner.close()
        super().close()


def _first_bad_byte(path: str, codec: str) -> tuple[int, int] | None:
    """(offset, byte) of the first byte ``codec`` cannot decode, reading in chunks; None: clean."""
    import codecs

    decoder = codecs.getincrementaldecoder(codec)()
    done = 0
    with _open_stream(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = done - pending + exc.start
                return at, (exc.object[exc.start] if exc.object else 0)
            done += len(chunk)
            if not chunk:
                return None


def _stream_jsonl(path: str, spec: DataSpec, explicit: bool, notes):
    """A jsonl file's records in chunks, decoded as it streams. A file that is not in the
    encoding asked for goes the whole-file way (detection needs all of it); reading errors are
    those of ``read_file``."""
    encoding = spec.encoding
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        bad = None if encoding == "auto" else _first_bad_byte(path, codec)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read or decompress it ({exc or type(exc).__name__})",
            hint="the file is damaged or truncated: copy or download it again",
        ) from None
    if encoding == "auto" or bad is not None:
        records = read_file(path, spec.format, encoding, explicit, notes)
        for s in range(0, len(records), CHUNK):
            yield records[s : s + CHUNK]
        return
    yield from jsonl_chunks(path, encoding)


def jsonl_chunks(path: str, encoding: str):
    """A jsonl file's records in chunks of CHUNK, decoded as they stream (no detection: that
    needs the whole file); a line that is not JSON, or a byte ``encoding`` cannot decode, is a
    DataError naming the line."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    chunk: list[dict] = []
    lineno = 0
    try:
        with (
            _open_stream(path) as raw,
            io.TextIOWrapper(io.BufferedReader(raw), encoding=codec, newline=None) as f,
        ):
            for lineno, line in enumerate(f, 1):  # noqa: B007 (read after the loop on errors)
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                chunk.append(r if isinstance(r, dict) else {"text": r})
                if len(chunk) >= CHUNK:
                    yield chunk
                    chunk = []
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not {encoding} text near line {lineno + 1} ({exc.reason})",
            hint="set data.encoding to the file's encoding",
        ) from None
    except RecursionError:
        raise DataError(f"{path}: cannot read as jsonl: nested too deeply") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(f"{path}: cannot read as jsonl: {exc}") from None
    if chunk:
        yield chunk


def _stream_parquet(path: str):
    """A parquet file's records in chunks, as pandas would read the whole file: an integer column
    with a missing value anywhere in the file reads as floats in every chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta, to_float = pf.metadata, set()
        for i, f in enumerate(pf.schema_arrow):
            if not pa.types.is_integer(f.type):
                continue
            stats = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
            if all(st is not None and st.has_null_count for st in stats):
                nulls = sum(st.null_count for st in stats)
            else:
                nulls = pf.read(columns=[f.name]).column(0).null_count
            if nulls:
                to_float.add(f.name)
        for batch in pf.iter_batches(batch_size=CHUNK):
            for name in to_float:
                i = batch.schema.get_field_index(name)
                batch = batch.set_column(i, name, batch.column(i).cast(pa.float64()))
            yield batch.to_pandas().to_dict(orient="records")
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as parquet: {exc}") from None


def iter_source(source: DataSource, spec: DataSpec, notes: list | None = None):
    """The records of a resolved data source in chunks (lists of at most ``CHUNK``): hub datasets,
    jsonl and parquet files stream through; smaller formats (csv, yaml, json, txt, folders) are
    read whole, as ``read_source`` does, then handed on in chunks."""
    if source.kind == "hub":
        ds = _load_hub(source.hub_id, spec)
        for batch in ds.iter(batch_size=CHUNK):
            cols = list(batch)
            yield [dict(zip(cols, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        return
    explicit = "encoding" in spec.model_fields_set
    stream = source.kind != "folder" or not (
        spec.format in ("auto", "folder")
        and any(p.is_dir() for p in Path(source.paths[0]).iterdir())
    )
    if not stream:
        records = read_source(source, spec, notes)
        for s in range(0, len(records), CHUNK):
            yield records[s : s + CHUNK]
        return
    if source.kind == "folder":
        folder = Path(source.paths[0])
        files = sorted(
            str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"data folder {folder} holds no files",
                hint="a folder of <label>/*.txt files, or data files",
            )
    else:
        files = list(source.paths)
    for f in files:
        kind = _format_of(f, spec.format)
        if kind == "jsonl":
            yield from _stream_jsonl(f, spec, explicit, notes)
        elif kind == "parquet":
            yield from _stream_parquet(f)
        else:
            records = read_file(f, spec.format, spec.encoding, explicit, notes)
            for s in range(0, len(records), CHUNK):
                yield records[s : s + CHUNK]


def _load_hub(hub_id: str, spec: DataSpec):
    """The hub dataset as a ``datasets.Dataset`` (Arrow, memory-mapped from the hub cache)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, spec.subset, split=spec.hub_split)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise DataError(
            f"cannot load hub dataset {hub_id!r} (split {spec.hub_split!r}): {exc}"
        ) from None


def _read_hub(hub_id: str, spec: DataSpec) -> list[dict]:
    return _load_hub(hub_id, spec).to_list()
