"""Preference and reward data (task preference | reward): records -> canonical pairs and KTO rows,
the bad rows counted and dropped, and the token features the losses read.

Canonical examples (what the split files hold): a pair ``{"prompt", "chosen", "rejected"}`` and a
KTO row ``{"prompt", "completion", "desirable"}``; ``prompt`` is text or a list of messages, the
answers are text. Features: per pair ``chosen_input_ids``/``chosen_labels`` and the rejected side's
(prompt + answer + EOS, labels only on the answer), per KTO row ``input_ids``/``labels``/
``desirable``; ``length`` the longer side's. docs/preference.md describes the layouts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ftcli.data.rows import PAIR_COLUMNS, SPARSE, Rows, Scratch, TableWriter
from ftcli.errors import DataError

PAIR_TASKS = ("preference", "reward")
IGNORE_INDEX = -100  # the label of a token no loss reads (tokenize.IGNORE_INDEX)

# The bad rows, counted and dropped (data.json's "dropped" keys), in the order they are checked.
BAD_WORDS = {
    "mismatched_prompts": "its chosen and rejected conversations differ before the last "
    "(assistant) turn",
    "empty_completion": "an answer is empty or missing",
    "chosen_equals_rejected": "chosen equals rejected",
    "unpaired": "an unpaired (KTO) row: only preference.loss kto trains on those",
}

_YES = {"true", "1", "desirable", "good", "chosen", "yes"}
_NO = {"false", "0", "undesirable", "bad", "rejected", "no"}


def wants_kto(recipe) -> bool:
    """Whether the run trains on KTO rows (preference.loss kto): unpaired rows are kept, and each
    pair becomes one desirable and one undesirable row when tokenized."""
    loss = getattr(getattr(recipe, "preference", None), "loss", None)
    return recipe.task == "preference" and loss == "kto"


def _cols(d) -> dict[str, str | None]:
    return {
        "prompt": d.prompt_column or "prompt",
        "chosen": d.chosen_column,
        "rejected": d.rejected_column,
        "completion": d.completion_column or "completion",
        "label": d.label_col,
        "messages": d.messages_column,
    }


def _listish(v):
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v


def _present(v) -> bool:
    v = _listish(v)
    return v is not None and not (isinstance(v, float) and v != v)


def _filled(v) -> bool:
    """Present and not empty (an empty string or list reads as absent)."""
    v = _listish(v)
    return _present(v) and not (isinstance(v, str | list | dict) and not v)


def _is_conversation(v) -> bool:
    v = _listish(v)
    return isinstance(v, list) and len(v) > 1


def missing_columns(recipe, records: list[dict], at: str = "data") -> dict[str, str]:
    """dotted recipe key -> column, for the columns the data lacks: a pair layout needs the chosen
    and rejected columns (and a prompt column unless they hold whole conversations), the KTO
    layout completion and label columns (and a prompt column), a messages layout its column."""
    c = _cols(recipe.data)
    seen: set = set()
    for r in records[:1000]:
        seen |= set(r)
    has = {k: c[k] in seen for k in c if c[k]}
    if c["messages"]:
        if not has["messages"]:
            return {f"{at}.messages_column": c["messages"]}
        if has["rejected"] or (has["completion"] and has["label"]):
            return {}
        return {f"{at}.rejected_column": c["rejected"]}
    pair = has["chosen"] and has["rejected"]
    kto = has["completion"] and has["label"]
    if not pair and not kto:
        keys = ("completion", "label") if (has["completion"] or has["label"]) else ()
        keys = keys if keys and not (has["chosen"] or has["rejected"]) else ("chosen", "rejected")
        return {f"{at}.{k}_column": c[k] for k in keys if not has[k]}
    if has["prompt"]:
        return {}
    first = next((r for r in records if _present(r.get(c["chosen"]))), None)
    if pair and first is not None and _is_conversation(first[c["chosen"]]):
        return {}  # whole conversations: their shared turns are the prompt
    return {f"{at}.prompt_column": c["prompt"]}


def _text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _messages(value, what: str, recno: int) -> list[dict]:
    value = _listish(value)
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    ):
        raise DataError(
            f"record {recno}: {what} must be a list of {{role, content}} messages",
            hint='for example [{"role": "user", "content": "Hi"}]',
        )
    for m in value:
        carried = [k for k in ("reasoning_content", "tool_calls") if _filled(m.get(k))]
        if carried:
            raise DataError(
                f"record {recno}: {what} has a message with {' and '.join(carried)}: preference "
                "pairs are read as role and content only",
                hint="leave reasoning and tool calls out of preference data (supervised chat "
                "data, task causal_lm, trains on them)",
            )
    return [{"role": str(m["role"]), "content": _text(m["content"])} for m in value]


def _answer(value) -> str | None:
    """An answer's text: a string, an assistant message, or a one-element list of either."""
    value = _listish(value)
    if not _present(value):
        return None
    if isinstance(value, list):
        if len(value) != 1:
            return None
        value = value[0]
    if isinstance(value, dict):
        return _text(value.get("content")) if "content" in value else None
    return _text(value)


def _prompt(value, what: str, recno: int) -> str | list[dict]:
    value = _listish(value)
    if isinstance(value, list):
        return _messages(value, what, recno)
    if isinstance(value, dict):
        raise DataError(
            f"record {recno}: {what} is one message; a prompt is text or a list of messages"
        )
    return _text(value)


def _desirable(value, column: str, recno: int) -> bool:
    value = _listish(value)
    if isinstance(value, bool):
        return value
    word = _text(value).strip().lower()
    if word in ("1.0", "0.0"):
        word = word[0]
    if word in _YES:
        return True
    if word in _NO:
        return False
    raise DataError(
        f"record {recno}: {column!r} is {value!r}, not a KTO label",
        hint="desirable rows: true, 1, desirable, good or chosen; undesirable: false, 0, "
        "undesirable, bad or rejected",
    )


def _same(a: list[dict], b: list[dict], strip: bool) -> bool:
    def norm(msgs):
        return [(m["role"], m["content"].strip() if strip else m["content"]) for m in msgs]

    return norm(a) == norm(b)


def to_pair_examples(recipe, records: list[dict], start: int = 0):
    """Records -> (canonical examples, their record numbers, [(bad kind, record number)]): the rows
    that cannot become an example (mismatched conversations, a missing answer, an unpaired row
    where pairs are trained) are left out and named. ``start``: records before these."""
    d = recipe.data
    c = _cols(d)
    kto = wants_kto(recipe)
    system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []

    def with_system(p):
        if isinstance(p, list) and system and not (p and p[0]["role"] == "system"):
            return system + p
        return p

    out, recnos, bad = [], [], []
    for i, r in enumerate(records):
        recno = start + i + 1
        ch, rj = r.get(c["chosen"]), r.get(c["rejected"])
        comp, lab = r.get(c["completion"]), r.get(c["label"])
        ex: dict | None = None
        kind = "empty_completion"
        if c["messages"]:
            msgs = _messages(r.get(c["messages"]), repr(c["messages"]), recno)
            if _present(rj):
                if _present(ch):
                    prompt, chosen = msgs, _answer(ch)
                elif msgs and msgs[-1]["role"] == "assistant":  # the last turn is the chosen one
                    prompt, chosen = msgs[:-1], msgs[-1]["content"]
                else:
                    prompt, chosen = msgs, None
                ex = {"prompt": prompt, "chosen": chosen, "rejected": _answer(rj)}
            elif _present(comp) or _present(lab):
                ex = {"prompt": msgs, "completion": _answer(comp), "label": lab}
        elif _present(ch) or _present(rj):
            if _is_conversation(ch) or _is_conversation(rj):
                a = _messages(ch, repr(c["chosen"]), recno) if _is_conversation(ch) else None
                b = _messages(rj, repr(c["rejected"]), recno) if _is_conversation(rj) else None
                if (
                    a is None
                    or b is None
                    or a[-1]["role"] != "assistant"
                    or b[-1]["role"] != "assistant"
                    or not _same(a[:-1], b[:-1], d.clean.strip)
                ):
                    kind = "mismatched_prompts"
                else:
                    ex = {
                        "prompt": a[:-1],
                        "chosen": a[-1]["content"],
                        "rejected": b[-1]["content"],
                    }
            else:
                prompt = _prompt(r.get(c["prompt"]), repr(c["prompt"]), recno)
                ex = {"prompt": prompt, "chosen": _answer(ch), "rejected": _answer(rj)}
        elif _present(comp) or _present(lab):
            prompt = _prompt(r.get(c["prompt"]), repr(c["prompt"]), recno)
            ex = {"prompt": prompt, "completion": _answer(comp), "label": lab}
        if ex is not None and "label" in ex:
            if not kto:
                ex, kind = None, "unpaired"
            elif not _present(ex["label"]):
                ex = None  # no verdict: nothing to learn from the row
            else:
                ex["desirable"] = _desirable(ex.pop("label"), c["label"], recno)
        if ex is not None and any(
            ex.get(k) is None for k in ("chosen", "rejected", "completion") if k in ex
        ):
            ex = None
        if ex is None:
            bad.append((kind, recno))
            continue
        ex["prompt"] = with_system(ex["prompt"])
        out.append(ex)
        recnos.append(recno)
    return out, recnos, bad


def strip(ex: dict) -> dict:
    """The example with its text and its prompt's messages stripped of surrounding whitespace."""
    out = {}
    for k, v in ex.items():
        if isinstance(v, str):
            out[k] = v.strip()
        elif isinstance(v, list):
            out[k] = [{"role": m["role"], "content": m["content"].strip()} for m in v]
        else:
            out[k] = v
    return out


def bad_kind(ex: dict) -> str | None:
    """Why a canonical example cannot be trained on (an empty answer, chosen equal to rejected)."""
    answers = [ex[k] for k in ("chosen", "rejected", "completion") if k in ex]
    if any(not a for a in answers):
        return "empty_completion"
    if "chosen" in ex and ex["chosen"] == ex["rejected"]:
        return "chosen_equals_rejected"
    return None


def is_empty(ex: dict) -> bool:
    """data.clean.drop_empty for pairs: an empty prompt (text, or a message without content)."""
    p = ex["prompt"]
    return not p if isinstance(p, str) else (not p or any(not m["content"] for m in p))


def clean_chunk(recipe, records: list[dict], start: int, counts, where: str) -> list[dict]:
    """A chunk of records as cleaned canonical examples: mapped, stripped (data.clean.strip), the
    bad rows counted per kind in ``counts.bad`` (the first one named in ``counts.first_bad``) and
    dropped, then the empty ones (data.clean.drop_empty) counted in ``counts.empty``."""
    d = recipe.data
    examples, recnos, bad = to_pair_examples(recipe, records, start)
    if d.clean.strip:
        examples = [strip(e) for e in examples]
    kept = []
    for e, n in zip(examples, recnos, strict=True):
        kind = bad_kind(e)
        if kind is None:
            kept.append((e, n))
        else:
            bad.append((kind, n))
    for kind, n in sorted(bad, key=lambda b: b[1]):
        counts.bad[kind] = counts.bad.get(kind, 0) + 1
        if counts.first_bad is None:
            counts.first_bad = f"{where}: record {n}: {BAD_WORDS[kind]}"
    examples = [e for e, _ in kept]
    if d.clean.drop_empty:
        full = [e for e in examples if not is_empty(e)]
        counts.empty += len(examples) - len(full)
        examples = full
    return examples


def dropped(counts) -> dict[str, int]:
    """data.json's "dropped" entries of the bad-row kinds (every kind, zero or not)."""
    return {k: counts.bad.get(k, 0) for k in BAD_WORDS}


# --------------------------------------------------------------------------- on Arrow


def arrow_schema():
    """Canonical examples on Arrow: one table for pairs and KTO rows, a text prompt in ``prompt``
    and a message prompt in ``prompt_messages``; rows decode sparse (``rows.SPARSE``) back to the
    canonical dicts."""
    import pyarrow as pa

    s = pa.string()
    msgs = pa.list_(pa.struct([("role", s), ("content", s)]))
    fields = [
        ("prompt", s),
        ("prompt_messages", msgs),
        ("chosen", s),
        ("rejected", s),
        ("completion", s),
        ("desirable", pa.bool_()),
    ]
    return pa.schema(fields, metadata={SPARSE: json.dumps({"prompt_messages": "prompt"})})


def to_arrow_row(ex: dict) -> dict:
    """A canonical example in ``arrow_schema``'s columns."""
    p = ex["prompt"]
    return {**ex, "prompt": None, "prompt_messages": p} if isinstance(p, list) else ex


class _Columns(Rows):
    """Rows decoded as stored, every column in every row (``datasets.map`` sees the same)."""

    def _decode(self, table) -> list[dict]:
        return table.to_pylist()


def _as_columns(examples: Sequence[dict]) -> _Columns:
    """The examples as ``_Columns`` on an Arrow file: prepared splits as they are; a list (a
    split read back from jsonl, a length sample) written to a temporary file first."""
    if isinstance(examples, Rows) and examples.path is not None:
        return _Columns(examples.table, examples.path, examples._keep)
    keep = Scratch()
    path = Path(keep.path) / "pairs.arrow"
    with TableWriter(path, arrow_schema()) as out:
        rows = [to_arrow_row(e) for e in examples]
        for s in range(0, len(rows), 10_000):
            out.rows(rows[s : s + 10_000])
    return _Columns.open(path, keep)


# --------------------------------------------------------------------------- tokenized


def feature_schema(kto: bool):
    """The Arrow schema of pair features (or KTO rows' with ``kto``)."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    if kto:
        fields = [("input_ids", ids), ("labels", ids), ("desirable", pa.int8())]
    else:
        fields = [(c, ids) for c in PAIR_COLUMNS]
    return pa.schema([*fields, ("length", pa.int32())])


def setup(examples: Sequence[dict], recipe):
    """(examples as the batch function reads them, its params, the feature schema): what
    ``tokenize.tokenize`` needs for preference and reward data."""
    d = recipe.data
    kto = wants_kto(recipe)
    params = {"L": d.max_length, "add_eos": d.add_eos, "kto": kto}
    return _as_columns(examples), params, feature_schema(kto)


def _side(prompt_ids: list[int], answer_ids: list[int], L: int):
    """(input ids, labels, truncated) of prompt + answer cut to ``L`` (the answer's end goes)."""
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return ids[:L], labels[:L], len(ids) > L


def pairs_batch(batch: dict, *, tokenizer, render, L: int, add_eos: bool, kto: bool) -> dict:
    """Features of a batch of examples (``arrow_schema``'s columns): the prompt tokenized once
    (rendered with ``render``, the chat template, when it is messages) and each answer after it
    (with the template's end of turn, and EOS as data.add_eos asks), cut to ``L``. ``keep`` is
    False when a side has no answer token left. ``kto``: one row per answer, pairs split in two."""
    n = len(next(iter(batch.values()))) if batch else 0
    col = {k: batch.get(k) or [None] * n for k in ("prompt", "prompt_messages")}
    prompts = [m if m is not None else (p or "") for p, m in zip(*col.values(), strict=True)]
    # (example, answer, desirable): the sides to tokenize, pairs' as chosen then rejected
    sides: list[tuple[int, str, int | None]] = []
    for i in range(n):
        if batch.get("chosen") and batch["chosen"][i] is not None:
            sides += [(i, batch["chosen"][i], 1), (i, batch["rejected"][i], 0)]
        elif kto and batch.get("completion") and batch["completion"][i] is not None:
            sides.append((i, batch["completion"][i], int(bool(batch["desirable"][i]))))
    texts = [render(tokenizer, p, True) if isinstance(p, list) else p for p in prompts]
    prompt_ids: list = [None] * n
    for special in (True, False):  # a chat template writes its own special tokens
        at = [i for i in range(n) if isinstance(prompts[i], str) is special]
        if at:
            enc = tokenizer([texts[i] for i in at], add_special_tokens=special)["input_ids"]
            for i, ids in zip(at, enc, strict=True):
                prompt_ids[i] = list(ids)
    parts = []
    for i, answer, _ in sides:
        p = prompts[i]
        if isinstance(p, list):  # the answer as the template writes it: with its end of turn
            full = render(tokenizer, [*p, {"role": "assistant", "content": answer}], False)
            parts.append(full[len(texts[i]) :] if full.startswith(texts[i]) else answer)
        else:
            parts.append(answer)
    answer_ids = tokenizer(parts, add_special_tokens=False)["input_ids"] if parts else []
    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    encoded = []
    for (i, _, good), part, ids in zip(sides, parts, answer_ids, strict=True):
        ids = list(ids)
        if (
            add_eos
            and eos_id is not None
            and not (eos and (texts[i] + part).rstrip().endswith(eos))
        ):
            ids.append(eos_id)
        encoded.append((i, good, *_side(prompt_ids[i], ids, L)))
    if kto:
        out: dict = {k: [] for k in ("input_ids", "labels", "desirable", "length")}
        out.update(truncated=[], keep=[])
        for _, good, ids, labels, cut in encoded:
            keep = any(t != IGNORE_INDEX for t in labels)
            out["input_ids"].append(ids if keep else [])
            out["labels"].append(labels if keep else [])
            out["desirable"].append(good)
            out["length"].append(len(ids) if keep else 0)
            out["truncated"].append(cut)
            out["keep"].append(keep)
        return out
    out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids")}
    out.update(rejected_labels=[], length=[], truncated=[], keep=[])
    for c, r in zip(encoded[0::2], encoded[1::2], strict=True):
        keep = all(any(t != IGNORE_INDEX for t in side[3]) for side in (c, r))
        for name, side in (("chosen", c), ("rejected", r)):
            out[f"{name}_input_ids"].append(side[2] if keep else [])
            out[f"{name}_labels"].append(side[3] if keep else [])
        out["length"].append(max(len(c[2]), len(r[2])) if keep else 0)
        out["truncated"].append(c[4] or r[4])
        out["keep"].append(keep)
    return out


def prompt_tokens(example: dict, tokenizer, render) -> int:
    """How many tokens an example's prompt takes (the error when truncation leaves no answer)."""
    p = example["prompt"]
    if isinstance(p, list):
        return len(tokenizer(render(tokenizer, p, True), add_special_tokens=False)["input_ids"])
    return len(tokenizer(p, add_special_tokens=True)["input_ids"])


def layout_of(splits) -> str:
    """What the prepared splits hold: "pairs", "kto rows" or "pairs and kto rows"."""
    n_pairs = n_rows = 0
    for rows in splits:
        if isinstance(rows, Rows):
            n_pairs += len(rows) - rows.table.column("chosen").null_count
            n_rows += len(rows) - rows.table.column("completion").null_count
        else:
            n_pairs += sum("chosen" in e for e in rows)
            n_rows += sum("completion" in e for e in rows)
    if n_pairs and n_rows:
        return "pairs and kto rows"
    return "kto rows" if n_rows else "pairs"


def check_left(examples, tokenized, split: str, L: int, tokenizer, render) -> None:
    """A DataError when truncation left no example of a split an answer token (the pairs cut
    short are counted in ``tokenized.dropped_no_target``; when it is all of them, nothing is left)."""
    if not len(examples) or len(tokenized.features):
        return
    k = prompt_tokens(examples[0], tokenizer, render)
    raise DataError(
        f"the {split} split: truncation at data.max_length {L} left none of its {len(examples)} "
        f"examples an answer token; its row 1 has a {k}-token prompt",
        hint="raise data.max_length, or shorten the prompts",
    )
