"""Reading data sources into records (dicts): hub datasets, local files in every format ftcli
knows (.jsonl .json .csv .tsv .parquet .txt .yml, also .gz/.bz2), folders of ``<label>/*.txt``."""

from __future__ import annotations

import bz2
import gzip
import io
import json
from pathlib import Path

import yaml

from ftcli.errors import DataError
from ftcli.recipe import DataSpec
from ftcli.sources import DataSource


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


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


def _read_yaml_records(path: str) -> list[dict]:
    """A YAML list of mappings, or chatterbot-corpus's ``conversations:`` lists (-> chat messages)."""
    with _open_text(path) as f:
        doc = yaml.safe_load(f)
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


def read_file(path: str, fmt: str = "auto") -> list[dict]:
    """Read one data file into a list of records (dicts)."""
    kind = _format_of(path, fmt)
    try:
        if kind in ("csv", "tsv"):
            import pandas as pd

            # dtype=str + no NA parsing: an empty text cell stays "" (not float NaN; TRAPS.md #9)
            df = pd.read_csv(
                path,
                sep="\t" if kind == "tsv" else ",",
                dtype=str,
                keep_default_na=False,
                compression="infer",
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
            return _read_yaml_records(path)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read as {kind}: {exc}") from None
    raise DataError(f"{path}: unsupported format {kind!r}")


def _read_label_folder(folder: Path) -> list[dict]:
    records = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(sub.glob("*.txt")):
            records.append(
                {"text": f.read_text(encoding="utf-8", errors="replace"), "label": sub.name}
            )
    return records


def read_source(source: DataSource, spec: DataSpec) -> list[dict]:
    """All records of a resolved data source."""
    if source.kind == "hub":
        return _read_hub(source.hub_id, spec)
    if source.kind == "folder":
        folder = Path(source.paths[0])
        if spec.format in ("auto", "folder") and any(p.is_dir() for p in folder.iterdir()):
            records = _read_label_folder(folder)
            if records:
                return records
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
        records.extend(read_file(f, spec.format))
    return records


def _read_hub(hub_id: str, spec: DataSpec) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, spec.subset, split=spec.hub_split)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise DataError(
            f"cannot load hub dataset {hub_id!r} (split {spec.hub_split!r}): {exc}"
        ) from None
    return ds.to_list()
