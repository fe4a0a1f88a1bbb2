"""``data.max_length: auto``: the length a run trains, evaluates, predicts and serves with, chosen
from the training split's own token lengths, so users need not guess it.

The rule: the 99th percentile (nearest rank) of the untruncated lengths of the training examples
(all of them, or a seeded sample of ``SAMPLE`` for big corpora), rounded up to ``PAD_MULTIPLE``,
never below ``FLOOR``, capped by the model's positions (and by ``train.batch_tokens``). Why the
99th: the maximum is hostage to one outlier, and max_length sets the memory peak; a lower
percentile (the 95th) cuts one example in twenty, and a causal LM's answer sits at the end, where
truncation cuts. The chosen int is written into the run's recipe.yaml, so every later reader of
the run folder (eval, predict, serve, merge) reads the number, never "auto".
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from ftcli.data.rows import lengths_of
from ftcli.data.tokenize import PAD_MULTIPLE, padded_width, tokenize
from ftcli.errors import FtcliError

PERCENTILE = 99
SAMPLE = 5000  # examples tokenized to choose: enough for a 99th percentile (50 above it)
FLOOR = 32  # tokens: a handful of short labels must not make every example a fragment
SAMPLE_SEED = 0  # fixed: the same corpus gives the same length on every run and every rank
UNBOUNDED = 1_048_576  # the schema's largest max_length: "untruncated"


@dataclass(frozen=True)
class LengthChoice:
    """What ``max_length: auto`` chose, and from what (recorded in run.json's data section)."""

    value: int
    policy: str  # "auto" or "explicit"
    percentile: int | None = None
    examples: int | None = None  # training examples measured
    sampled: bool = False  # a seeded sample of the training split, not all of it
    truncates: float | None = None  # share of the measured examples longer than value
    position_limit: int | None = None
    capped_by: str | None = None  # "the model's positions" | "train.batch_tokens"
    streamed: bool = False  # data.streaming: measured on the stream's first training examples

    def line(self) -> str:
        """The one line the data stage prints."""
        if self.policy != "auto":
            return f"max_length {self.value} (set in the recipe)"
        if not self.examples:
            return f"max_length auto: {self.value} (no training examples to measure: the floor)"
        which = (
            f"{self.examples:,} training examples"
            if self.sampled
            else (f"all {self.examples:,} training examples")
        )
        if self.streamed:
            which = f"the stream's first {self.examples:,} training examples"
        s = f"max_length auto: {self.value} (p{self.percentile} of {which}"
        if self.sampled:
            s += ", a seeded sample"
        s += f"; truncates {self.truncates:.1%}"
        if self.capped_by:
            s += f"; capped by {self.capped_by}"
        return s + ")"

    def as_dict(self) -> dict:
        if self.policy != "auto":
            return {"value": self.value, "policy": self.policy}
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if not self.streamed:  # data.json's record as before streaming existed
            out.pop("streamed")
        return out


def position_limit(config, tokenizer=None) -> int | None:
    """The most positions the model reads: its config's position table (read without weights),
    and the tokenizer's own bound where one is set (RoBERTa's table has 514 rows for 512 tokens)."""
    names = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    found = [getattr(config, a, None) for a in names]
    found.append(getattr(tokenizer, "model_max_length", None))
    # transformers' "no bound" is a huge int (~1e30)
    found = [v for v in found if isinstance(v, int) and 0 < v < UNBOUNDED]
    return min(found) if found else None


def token_lengths(examples: list[dict], recipe, tokenizer, label2id) -> list[int]:
    """Untruncated token lengths, as tokenize() builds each example (special tokens, chat
    template, EOS), in the order of ``examples`` (a preference pair: its longer side)."""
    data = recipe.data.model_copy(update={"max_length": UNBOUNDED, "long_documents": "truncate"})
    whole = recipe.model_copy(update={"data": data})
    return lengths_of(tokenize(examples, whole, tokenizer, label2id).features)


def percentile(lengths: list[int], q: int) -> int:
    """Nearest-rank percentile: the smallest length that at least q% of the lengths do not exceed."""
    s = sorted(lengths)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def choose(
    lengths: list[int],
    sampled: bool,
    limit: int | None,
    batch_tokens: int | None = None,
    q: int = PERCENTILE,
) -> LengthChoice:
    """The auto rule on measured lengths (pure: the tests drive it with lengths they choose)."""
    if not lengths:
        value = FLOOR if limit is None else min(FLOOR, limit)
        return LengthChoice(value, "auto", q, 0, sampled, 0.0, limit)
    value = max(FLOOR, padded_width(percentile(lengths, q)))
    capped_by = None
    if limit is not None and value > limit:
        value, capped_by = limit, f"the model's {limit} positions"
    if batch_tokens is not None and value > batch_tokens:
        value, capped_by = batch_tokens, f"train.batch_tokens ({batch_tokens})"
    cut = sum(n > value for n in lengths) / len(lengths)
    return LengthChoice(value, "auto", q, len(lengths), sampled, round(cut, 4), limit, capped_by)


def measure(examples: list[dict], recipe, tokenizer, label2id, limit: int | None) -> LengthChoice:
    """Choose from ``examples`` (the training split): all of them up to SAMPLE, else a seeded
    sample of SAMPLE."""
    sampled = len(examples) > SAMPLE
    if sampled:
        idx = sorted(random.Random(SAMPLE_SEED).sample(range(len(examples)), SAMPLE))
        examples = [examples[i] for i in idx]
    lengths = token_lengths(examples, recipe, tokenizer, label2id)
    return choose(lengths, sampled, limit, recipe.train.batch_tokens)


def with_max_length(recipe, value: int):
    """``recipe`` with data.max_length set to ``value`` (the recipe is frozen: a copy)."""
    return recipe.model_copy(
        update={"data": recipe.data.model_copy(update={"max_length": int(value)})}
    )


def model_position_limit(recipe, tokenizer=None) -> int | None:
    """The model's position limit from its config alone (no weights), None if unreadable."""
    from ftcli.memory.arch import load_config

    m = recipe.model
    try:
        cfg = load_config(m.name, m.revision, m.trust_remote_code).config
    except FtcliError:
        return None
    return position_limit(cfg, tokenizer)


def resolve(recipe, train_examples: list[dict], tokenizer, label2id):
    """(recipe with an int max_length, LengthChoice). An explicit value wins and is kept as is."""
    ml = recipe.data.max_length
    if ml != "auto":
        return recipe, LengthChoice(int(ml), "explicit")
    limit = model_position_limit(recipe, tokenizer)
    choice = measure(train_examples, recipe, tokenizer, label2id, limit)
    return with_max_length(recipe, choice.value), choice


def resolve_from_data(recipe, ui=None):
    """For commands that have a recipe but no run yet (estimate-memory): read the data and the
    tokenizer as training will, and choose the same way. Returns (recipe, LengthChoice)."""
    if recipe.data.max_length != "auto":
        return recipe, LengthChoice(int(recipe.data.max_length), "explicit")
    from ftcli.data.examples import prepare
    from ftcli.models import load_tokenizer

    tokenizer, _, _ = load_tokenizer(recipe.model)
    prepared = prepare(recipe)
    return resolve(recipe, prepared.splits["train"], tokenizer, prepared.label2id)


__all__ = ["FLOOR", "PAD_MULTIPLE", "PERCENTILE", "SAMPLE", "LengthChoice", "choose", "resolve"]


def with_data_length(recipe, prepared, ui):
    """``recipe`` with the max_length its data stage chose (data.json's record); the auto choice
    printed in one line."""
    length = LengthChoice(**prepared.stats["max_length"])
    if length.policy == "auto":
        ui.info("  " + length.line())
    return with_max_length(recipe, length.value)
