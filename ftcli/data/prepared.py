"""The data stage's output as files: ``write_data`` prepares and tokenizes every split into a
folder (Arrow files and one JSON), ``read_data`` maps them back without decoding them into Python
lists. The cache (``ftcli.data.store``) keeps such folders; a run reads one.

A folder holds, per split: ``<split>.examples.arrow`` (the canonical examples; ``.jsonl`` when the
split is an augmented list whose rows differ in keys) and ``<split>.features.arrow`` (input_ids,
labels, length); and ``data.json``: the format version, labels, stats and per-split token counts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftcli.data import pairs
from ftcli.data.examples import SPLITS, PreparedData, prepare
from ftcli.data.lengths import resolve as resolve_length
from ftcli.data.rows import Features, Rows
from ftcli.data.tokenize import Tokenized, render_chat, tokenize
from ftcli.errors import DataError, FtcliError
from ftcli.util import atomic_write_text, read_json, read_jsonl

FORMAT = 1  # bumped whenever what these files hold, or how, changes
DATA_JSON = "data.json"


def write_data(recipe, tokenizer, folder: Path, ui=None, *, load_predictor=None) -> None:
    """Prepare (read, clean, split) and tokenize every split, writing everything the run needs
    into ``folder`` (which exists and is empty): the splits and the tokenized features as Arrow
    files, plus one small JSON with labels, stats (data.json content) and per-split token
    summaries. Writes nothing outside ``folder``. ``load_predictor``: what paraphrase augmentation
    loads its model with (``serve.predictor.load_predictor``; data/ may not import serve/), needed
    only when the recipe asks for paraphrases."""
    from ftcli.data.examples import _write_jsonl_stream

    folder = Path(folder)
    prepared = prepare(recipe, folder=folder)
    if recipe.data.augment and recipe.data.augment.paraphrase:
        from ftcli.data.paraphrase import add_paraphrases

        if load_predictor is None:
            raise FtcliError("data.augment.paraphrase needs a model loader: pass load_predictor")
        prepared = add_paraphrases(prepared, recipe, load_predictor, ui)
    if recipe.task == "causal_lm" and recipe.data.train_on is not None:
        from ftcli.data.chat import train_on_problem

        problem = train_on_problem(recipe.data.train_on, prepared.splits["train"])
        if problem:
            raise DataError(
                problem, hint="remove data.train_on, or give the messages the parts it names"
            )
    recipe, length = resolve_length(recipe, prepared.splits["train"], tokenizer, prepared.label2id)
    prepared.stats["max_length"] = length.as_dict()  # run.json's data section records it
    tokenized = {}
    for s in SPLITS:
        rows = prepared.splits[s]
        if not isinstance(rows, Rows):  # an augmented list: its rows differ in keys
            (folder / f"{s}.examples.arrow").unlink(missing_ok=True)
            _write_jsonl_stream(folder / f"{s}.examples.jsonl", rows)
        tokenized[s] = tokenize(
            rows, recipe, tokenizer, prepared.label2id, folder=folder, name=f"{s}.features"
        )
        if recipe.task in pairs.PAIR_TASKS:  # every pair cut to no answer: name the first
            pairs.check_left(rows, tokenized[s], s, recipe.data.max_length, tokenizer, render_chat)
    record = {
        "format": FORMAT,
        "labels": prepared.labels,
        "stats": prepared.stats,
        "tokenized": {s: t.record() for s, t in tokenized.items()},
    }
    atomic_write_text(folder / DATA_JSON, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def read_data(folder: Path) -> tuple[PreparedData, dict[str, Tokenized]]:
    """Open what write_data wrote, memory-mapped (no full decode into Python lists).
    Raises DataError if a file is missing or unreadable."""
    folder = Path(folder)
    path = folder / DATA_JSON
    if not path.is_file():
        raise DataError(f"{folder}: no {DATA_JSON}: not a prepared data folder")
    try:
        record = read_json(path)
    except FtcliError as exc:
        raise DataError(exc.message, hint=exc.hint) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: written by another version of ftcli (format {FORMAT} expected)")
    splits, tokenized = {}, {}
    for s in SPLITS:
        try:
            counts = record["tokenized"][s]
            examples = folder / f"{s}.examples.arrow"
            if examples.is_file():
                splits[s] = Rows.open(examples)
            else:
                listed = folder / f"{s}.examples.jsonl"
                if not listed.is_file():
                    raise FileNotFoundError(str(examples))
                splits[s] = read_jsonl(listed)
            feats = Features.open(folder / f"{s}.features.arrow")
            if len(feats) != counts["examples"] or len(splits[s]) != record["stats"]["sizes"][s]:
                raise ValueError(f"{s}: fewer rows than data.json records")
            tokenized[s] = Tokenized(
                feats, counts["truncated"], counts["dropped_no_target"], counts["tokens"]
            )
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{folder}: the {s} split cannot be read ({type(exc).__name__}: {exc})",
                hint="the prepared data is damaged or incomplete: prepare it again",
            ) from None
    return PreparedData(splits, record.get("labels"), record.get("stats") or {}), tokenized


def data_table(prepared, tokenized, max_length: int) -> list[tuple]:
    """The prepare stage's table: split sizes and tokens, what was dropped, the labels."""
    rows = [(s, tokenized[s].summary(max_length)) for s in SPLITS]
    dropped = {k: v for k, v in prepared.stats["dropped"].items() if v}
    if dropped:
        rows.append(
            ("dropped", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items()))
        )
    aug = prepared.stats.get("augmented")
    if aug:
        ops = ", ".join(f"{n} {op}" for op, n in aug["by_op"].items() if n)
        rows.append(("augmented", f"{aug['added']} train copies ({ops or 'none'})"))
    if prepared.labels:
        rows.append(("labels", ", ".join(prepared.labels)))
    for name, info in (prepared.stats.get("sources") or {}).items():  # a mixture, per source
        sizes = info.get("sizes", {})
        text = " / ".join(f"{sizes.get(s, 0)} {s}" for s in SPLITS)
        if info.get("repeated"):
            text += f" ({info['repeated']} train repeats)"
        rows.append((f"source {name}", text))
    return rows
