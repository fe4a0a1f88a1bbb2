"""THROWAWAY (branch h-cache only): write_data/read_data over today's list-based prepare() and
tokenize(), so the data cache can be built and tested before the Arrow version lands. The lead
keeps the Arrow version of this module at merge; nothing may depend on these file formats."""

from __future__ import annotations

import json
from pathlib import Path

from ftcli.data.examples import SPLITS, PreparedData, prepare
from ftcli.data.tokenize import Tokenized, tokenize
from ftcli.errors import DataError
from ftcli.util import read_jsonl, write_jsonl

FORMAT_VERSION = 0


def write_data(recipe, tokenizer, folder: Path, ui=None) -> None:
    """Prepare and tokenize every split into ``folder``: jsonl splits and features, one JSON."""
    folder = Path(folder)
    prepared = prepare(recipe)
    meta: dict = {"labels": prepared.labels, "stats": prepared.stats, "tokenized": {}}
    for s in SPLITS:
        tok = tokenize(prepared.splits[s], recipe, tokenizer, prepared.label2id)
        write_jsonl(folder / f"{s}.examples.jsonl", prepared.splits[s])
        write_jsonl(folder / f"{s}.features.jsonl", tok.features)
        meta["tokenized"][s] = {
            "truncated": tok.truncated,
            "dropped_no_target": tok.dropped_no_target,
            "tokens": tok.tokens,
        }
    (folder / "meta.json").write_text(json.dumps(meta) + "\n")


def read_data(folder: Path) -> tuple[PreparedData, dict[str, Tokenized]]:
    """What write_data wrote; DataError when a file is missing or unreadable."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = {s: read_jsonl(folder / f"{s}.examples.jsonl") for s in SPLITS}
        tokenized = {
            s: Tokenized(read_jsonl(folder / f"{s}.features.jsonl"), **meta["tokenized"][s])
            for s in SPLITS
        }
        for s in SPLITS:
            if not (folder / f"{s}.features.jsonl").is_file():
                raise FileNotFoundError(folder / f"{s}.features.jsonl")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: cannot read the prepared data ({exc})") from None
    return PreparedData(splits, meta["labels"], meta["stats"]), tokenized
