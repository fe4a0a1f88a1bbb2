"""Today's (pre-Arrow) prepare() and tokenize(), kept verbatim only as the reference the Arrow
implementation is compared against (tests/unit/test_data_arrow.py). Not imported by ftcli."""

# ruff: noqa

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftcli.data.read import read_source
from ftcli.errors import DataError, RecipeError, SourceError
from ftcli.recipe import DataSpec, Recipe
from ftcli.sources import resolve_data
from ftcli.data.tokenize import IGNORE_INDEX, render_chat

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


def required_columns(recipe: Recipe) -> dict[str, str]:
    """dotted recipe key -> column name, for every column the task reads."""
    d = recipe.data
    if recipe.task == "classification":
        return {"data.text_column": d.text_column, "data.label_column": d.label_col}
    keys = {
        "chat": ["messages_column"],
        "instruction": ["instruction_column", "output_column"]
        + (["input_column"] if d.input_column else []),
        "completion": ["prompt_column", "completion_column"],
        "text": ["text_column"],
    }[d.style]
    return {f"data.{k}": getattr(d, k) for k in keys}


def check_columns(recipe: Recipe, records: list[dict], source: str) -> None:
    """Raise a located RecipeError when a named column is missing from the data."""
    if not records:
        raise DataError(
            f"the dataset is empty: {source} holds no records",
            hint="check data.path; a CSV needs a header row and at least one data row",
        )
    columns = list(records[0].keys())
    problems = [
        _column_problem(recipe, key, col, columns)
        for key, col in required_columns(recipe).items()
        if col not in records[0]
    ]
    if recipe.task == "classification" and not recipe.data.label_column:
        problems = [
            recipe.problem(
                "data.label_column",
                "classification needs a label column: the data has no column 'label' (the "
                f"default); its columns are: {', '.join(map(str, columns))}",
                "name the column that holds each example's label",
            )
            if p.key == "data.label_column"
            else p
            for p in problems
        ]
    if problems:
        raise RecipeError(problems)


def to_examples(recipe: Recipe, records: list[dict]) -> list[dict]:
    """Records -> canonical examples: {"text","label"} | {"text"} | {"prompt","completion"} | {"messages"}."""
    d = recipe.data
    if recipe.task == "classification":
        return [
            {"text": _text(r.get(d.text_column)), "label": _text(r.get(d.label_col))}
            for r in records
        ]
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
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs
        ):
            raise DataError(
                f"record {i + 1}: {d.messages_column!r} must be a list of {{role, content}} messages",
                hint='for example [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]',
            )
        out.append(
            {
                "messages": system
                + [{"role": str(m["role"]), "content": _text(m["content"])} for m in msgs]
            }
        )
    return out


# --------------------------------------------------------------------------- cleaning and splitting


def _strip(ex: dict) -> dict:
    out = {}
    for k, v in ex.items():
        if isinstance(v, str):
            out[k] = v.strip()
        elif k == "messages":
            out[k] = [{"role": m["role"], "content": m["content"].strip()} for m in v]
        else:
            out[k] = v
    return out


def _is_empty(ex: dict) -> bool:
    if "messages" in ex:
        msgs = ex["messages"]
        return not any(m["role"] == "assistant" and m["content"] for m in msgs) or any(
            not m["content"] for m in msgs
        )
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


def clean(examples: list[dict], spec: DataSpec, counts: CleanCounts) -> list[dict]:
    counts.read += len(examples)
    if spec.clean.strip:
        examples = [_strip(e) for e in examples]
    if spec.clean.drop_empty:
        kept = [e for e in examples if not _is_empty(e)]
        counts.empty += len(examples) - len(kept)
        examples = kept
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


def _filter_labels(
    recipe: Recipe, examples: list[dict], counts: CleanCounts
) -> tuple[list[dict], list[str]]:
    present = collections.Counter(e["label"] for e in examples)
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
        kept = [e for e in examples if e["label"] in wanted]
        counts.unlisted_label += len(examples) - len(kept)
        return kept, list(wanted)
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
    return examples, labels


def _split_off(
    examples: list[dict], fraction: float, seed: int, stratify: bool, name: str, asked: float
) -> tuple[list[dict], list[dict]]:
    """(rest, held) with ``fraction`` of the examples held out, stratified by label when possible.
    ``name`` and ``asked`` (the recipe's data.split.<name>) word the error."""
    if fraction <= 0 or not examples:
        return examples, []
    n_held = max(1, round(len(examples) * fraction))
    if n_held >= len(examples):
        n = len(examples)
        raise DataError(
            f"only {n} example{'' if n == 1 else 's'} left to split: too few to hold out a "
            f"{name} split (data.split.{name}: {asked:g}) and still train on something",
            hint=f"add data, or set data.split.{name} to 0",
        )
    from sklearn.model_selection import train_test_split

    labels = [e.get("label") for e in examples]
    counts = collections.Counter(labels)
    can_stratify = (
        stratify
        and labels[0] is not None
        and min(counts.values()) >= 2
        and n_held >= len(counts)
        and len(examples) - n_held >= len(counts)
    )
    rest, held = train_test_split(
        examples, test_size=n_held, random_state=seed, stratify=labels if can_stratify else None
    )
    return list(rest), list(held)


def _cap(examples: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(examples) <= limit:
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in idx]


@dataclass(frozen=True)
class PreparedData:
    """The splits (canonical examples), the label map and what happened on the way."""

    splits: dict[str, list[dict]]
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
        key = next(
            (
                f"data.{k}"
                for k in ("path", "validation_path", "test_path")
                if getattr(d, k) == spec
            ),
            None,
        )
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


def load_examples(recipe: Recipe, spec: str, counts: CleanCounts) -> list[dict]:
    source = source_of(recipe, spec)
    records = read_source(source, recipe.data, counts.notes)
    check_columns(recipe, records, spec)
    try:
        examples = to_examples(recipe, records)
    except DataError as exc:  # "record 7: ..." needs the file it is in
        raise DataError(f"{spec}: {exc.message}", hint=exc.hint) from None
    return clean(examples, recipe.data, counts)


def prepare(recipe: Recipe) -> PreparedData:
    """Read, clean and split the data (``save_prepared`` writes it to the run's data/ folder)."""
    d = recipe.data
    counts = CleanCounts()
    examples = load_examples(recipe, d.path, counts)
    explicit = {
        name: load_examples(recipe, p, counts)
        for name, p in (("validation", d.validation_path), ("test", d.test_path))
        if p
    }
    labels = None
    if recipe.task == "classification":
        examples, labels = _filter_labels(recipe, examples, counts)
        for name in list(explicit):
            explicit[name] = [e for e in explicit[name] if e["label"] in labels]
    if not examples:
        raise DataError(
            f"no examples left in {d.path} after cleaning "
            f"({counts.read} read, {counts.empty} empty, {counts.duplicate} duplicates)"
        )

    # No example may sit in two splits: explicit files win over the training pool.
    overlap = 0
    held_keys: set[str] = set()
    for name in ("test", "validation"):
        if name in explicit:
            before = len(explicit[name])
            explicit[name] = [e for e in explicit[name] if _key(e) not in held_keys]
            overlap += before - len(explicit[name])
            held_keys |= {_key(e) for e in explicit[name]}
    before = len(examples)
    examples = [e for e in examples if _key(e) not in held_keys]
    overlap += before - len(examples)

    seed, strat = d.split.seed, d.split.stratify
    pool = examples
    if "test" in explicit:
        test = explicit["test"]
    else:
        pool, test = _split_off(pool, d.split.test, seed, strat, "test", d.split.test)
    if "validation" in explicit:
        validation = explicit["validation"]
    else:
        # fraction of the whole, not of what is left after the test split
        frac = d.split.validation / max(1e-9, 1 - (0 if "test" in explicit else d.split.test))
        pool, validation = _split_off(
            pool, min(frac, 0.95), seed + 1, strat, "validation", d.split.validation
        )
    # Whatever clean.dedupe says, the sealed test split shares no example with train or
    # validation, nor validation with train: copies left in the pool are dropped and counted.
    test_keys = {_key(e) for e in test}
    before = len(validation)
    validation = [e for e in validation if _key(e) not in test_keys]
    overlap += before - len(validation)
    held_keys = test_keys | {_key(e) for e in validation}
    before = len(pool)
    pool = [e for e in pool if _key(e) not in held_keys]
    overlap += before - len(pool)
    splits = {
        "train": _cap(pool, d.max_train_examples, seed),
        "validation": _cap(validation, d.max_validation_examples, seed),
        "test": _cap(test, d.max_test_examples, seed),
    }
    if not splits["train"]:
        raise DataError(
            "the training split is empty", hint="add data, or lower data.split fractions"
        )
    if not splits["test"]:
        raise DataError(
            "the test split is empty: there is nothing to evaluate on",
            hint="set data.split.test above 0, or data.test_path",
        )
    if labels:
        missing = [lab for lab in labels if not any(e["label"] == lab for e in splits["train"])]
        if missing:
            raise DataError(
                f"label(s) {missing} have no training example after splitting",
                hint="add examples of them, or drop them with data.labels",
            )

    augmented = None
    if d.augment is not None:  # after the split, on train only: validation and test stay as read
        from ftcli.data.augment import augment_train

        splits["train"], augmented = augment_train(splits["train"], d.augment, recipe.task)
    stats = {
        "source": d.path,
        "read": counts.read,
        "dropped": {
            "unlisted_label": counts.unlisted_label,
            "empty": counts.empty,
            "duplicate": counts.duplicate,
            "shared_between_splits": overlap,
        },
        "sizes": {k: len(v) for k, v in splits.items()},
    }
    if counts.notes:
        stats["notes"] = counts.notes
    if augmented is not None:
        stats["augmented"] = augmented
    if labels:
        stats["label_counts"] = {
            k: dict(collections.Counter(e["label"] for e in v)) for k, v in splits.items()
        }
    if d.style != "text" and recipe.task == "causal_lm":
        stats["layout"] = d.style
    return PreparedData(splits, labels, stats)


@dataclass(frozen=True)
class Tokenized:
    features: list
    truncated: int
    dropped_no_target: int
    tokens: int


def _chat_segments(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The assistant spans as they were always found: every prefix rendered for real."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        if i == len(messages) - 1:
            end = len(full)
        else:
            end = len(render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False))
        spans.append((start, end))
    return full, spans


def tokenize(
    examples: list[dict], recipe: Recipe, tokenizer, label2id: dict[str, int] | None
) -> Tokenized:
    """Tokenize canonical examples; labels mask everything but the completion for causal LMs."""
    d = recipe.data
    L = d.max_length
    if recipe.task == "classification":
        texts = [e["text"] for e in examples]
        full = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
        enc = tokenizer(texts, truncation=True, max_length=L, add_special_tokens=True)
        feats = [
            {"input_ids": ids, "attention_mask": m, "labels": label2id[e["label"]]}
            for ids, m, e in zip(enc["input_ids"], enc["attention_mask"], examples, strict=True)
        ]
        return Tokenized(
            feats, sum(len(f) > L for f in full), 0, sum(len(f["input_ids"]) for f in feats)
        )

    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    feats, truncated, dropped = [], 0, 0
    for e in examples:
        if "messages" in e:
            text, spans = _chat_segments(tokenizer, e["messages"])
            special = False
        elif "prompt" in e:
            text, spans = (
                e["prompt"] + e["completion"],
                [(len(e["prompt"]), len(e["prompt"]) + len(e["completion"]))],
            )
            special = True
        else:
            text, spans = e["text"], [(0, len(e["text"]))]
            special = True
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if d.loss_on == "all":
            mask = [True] * len(ids)
        else:
            mask = [
                any(s < b and a < t for s, t in spans) if b > a else False
                for a, b in enc["offset_mapping"]
            ]
        if d.add_eos and eos_id is not None and not (eos and text.rstrip().endswith(eos)):
            ids.append(eos_id)
            mask.append(True)
        if len(ids) > L:
            truncated += 1
            ids, mask = ids[:L], mask[:L]
        if not any(mask):
            dropped += 1
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Tokenized(feats, truncated, dropped, sum(len(f["input_ids"]) for f in feats))
