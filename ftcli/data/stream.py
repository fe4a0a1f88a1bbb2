"""``data.streaming: true``: corpora larger than memory or the disk budget, read as they train.

The source (local jsonl/parquet files, or a hub dataset with ``streaming=True``) is read from
its start on every pass, in chunks; nothing of it is written to disk. Each canonical example is
given a split by a keyed hash of its canonical JSON (``split_hash``): a number in [0, 1) below
``split.test`` is the test bucket, below ``split.test + split.validation`` validation, else train.
The hash is a function of the example and ``data.split.seed`` alone, so every run puts an example
in the same split without reading the whole corpus first, identical examples share a bucket, and
training never sees a test- or validation-bucket example anywhere in the stream.

A short scan of the stream's start (``scan``) collects the sealed test split (the first
``max_test_examples`` test-bucket examples, default ``DEFAULT_MAX_TEST``), the validation split
likewise, and the first ``MEASURE`` training examples (for ``max_length: auto`` and the labels).
Training then reads the stream again (``StreamedBatches``): tokenized in batches as it goes, a
seeded shuffle buffer of ``data.shuffle_buffer`` examples, micro-batches grouped by length within
it, every rank taking every k-th micro-batch of one deterministic sequence; at the end of the
source it starts over (the next pass reshuffles). Memory is bounded by the buffer and the dedupe
window, never by the corpus.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ftcli.data.examples import (
    PreparedData,
    _is_empty,
    _key,
    _strip,
    check_columns,
    source_of,
    to_examples,
)
from ftcli.data.read import CHUNK, _format_of, _stream_parquet
from ftcli.data.read import jsonl_chunks as _jsonl
from ftcli.data.tokenize import (
    BATCH,
    Tokenized,
    causal_params,
    features_batch,
    padded_width,
    tokenize,
)
from ftcli.errors import DataError, RecipeError

DEFAULT_MAX_TEST = 1_000  # test examples collected when data.max_test_examples is not set
DEFAULT_MAX_VALIDATION = 1_000  # the same for validation
MEASURE = 5_000  # first training-bucket examples: max_length auto, labels, the eva sample
DEDUPE_WINDOW = 100_000  # clean.dedupe: an example is dropped if one of the last N kept equals it
FORMATS = ("jsonl", "parquet")  # local formats read as a stream (plus .gz/.bz2 of jsonl)
NOTE = "streaming: not cached (the training split is read and tokenized as it trains)"


# --------------------------------------------------------------------------- the hash split


def split_hash(example: dict, seed: int) -> bytes:
    """16 bytes keyed by ``seed``: the example's identity (dedupe) and its split (``bucket``)."""
    key = str(int(seed)).encode()
    return hashlib.blake2b(_key(example).encode(), digest_size=16, key=key).digest()


def bucket(h: bytes) -> float:
    """The hash as a number in [0, 1)."""
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(h: bytes, test: float, validation: float) -> str:
    u = bucket(h)
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def fractions(recipe) -> tuple[float, float]:
    """(test, validation) bucket widths: 0 for a split that has its own file."""
    d = recipe.data
    return (
        0.0 if d.test_path else d.split.test,
        0.0 if d.validation_path else d.split.validation,
    )


class Window:
    """The last ``size`` hashes kept: a bounded, approximate dedupe (copies further apart pass)."""

    def __init__(self, size: int):
        self.size, self.order, self.seen = size, collections.deque(), set()

    def add(self, h: bytes) -> bool:
        """False when ``h`` is among the last ``size`` kept (a duplicate), else remember it."""
        if h in self.seen:
            return False
        self.order.append(h)
        self.seen.add(h)
        if len(self.order) > self.size:
            self.seen.discard(self.order.popleft())
        return True


# --------------------------------------------------------------------------- reading the source


def _files(recipe, key: str, source) -> list[str]:
    """The files of a local source, every one in a streamed format (a located error otherwise)."""
    d = recipe.data
    if source.kind == "folder":
        folder = Path(source.paths[0])
        if any(p.is_dir() for p in folder.iterdir()):
            raise RecipeError(
                [
                    recipe.problem(
                        key,
                        f"data.streaming reads jsonl or parquet files; {folder} is a folder of "
                        "label folders",
                        "convert it to jsonl (one {text, label} record per line), or remove "
                        "data.streaming",
                    )
                ]
            )
        files = sorted(
            str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
    else:
        files = list(source.paths)
    for f in files:
        kind = _format_of(f, d.format)
        if kind not in FORMATS:
            raise RecipeError(
                [
                    recipe.problem(
                        "data.format" if "format" in d.model_fields_set else key,
                        f"data.streaming reads {' and '.join(FORMATS)} files (.jsonl also "
                        f".gz/.bz2) and hub datasets; {f} is {kind}",
                        "convert it to jsonl or parquet, or remove data.streaming (the whole "
                        "file is then read and cached)",
                    )
                ]
            )
    return files


def _hub(hub_id: str, spec) -> Iterator[list[dict]]:
    """A hub dataset read with ``streaming=True``: records arrive as they download."""
    import datasets

    from ftcli.sources import hub_offline

    try:
        ds = datasets.load_dataset(hub_id, spec.subset, split=spec.hub_split, streaming=True)
        chunk: list[dict] = []
        for r in ds:
            chunk.append(dict(r))
            if len(chunk) >= CHUNK:
                yield chunk
                chunk = []
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        offline = hub_offline()
        raise DataError(
            f"cannot stream hub dataset {hub_id!r} (split {spec.hub_split!r}): {exc}",
            hint="streaming reads the hub while it trains, so it needs the network"
            + (" (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if offline else "")
            + "; or download the data as jsonl/parquet files and stream those",
        ) from None
    if chunk:
        yield chunk


def records(recipe, key: str = "data.path") -> Iterator[list[dict]]:
    """The records of the source at recipe key ``key`` (data.path, data.validation_path,
    data.test_path), in chunks, from its start."""
    d = recipe.data
    spec = getattr(d, key.split(".", 1)[1])
    source = source_of(recipe, spec)
    if source.kind == "hub":
        yield from _hub(source.hub_id, d)
        return
    for f in _files(recipe, key, source):
        if _format_of(f, d.format) == "parquet":
            yield from _stream_parquet(f)
        else:
            yield from _jsonl(f, d.encoding)


@dataclass
class Counts:
    """What the stream dropped, and what it read."""

    read: int = 0
    empty: int = 0
    duplicate: int = 0
    unlisted_label: int = 0
    shared_between_splits: int = 0

    def dropped(self) -> dict:
        return {
            "unlisted_label": self.unlisted_label,
            "empty": self.empty,
            "duplicate": self.duplicate,
            "shared_between_splits": self.shared_between_splits,
        }


def examples(recipe, counts: Counts, key: str = "data.path") -> Iterator[tuple[dict, bytes]]:
    """(canonical example, split hash) of the source at ``key`` in stream order, cleaned as
    ``clean`` does per example: strip, drop_empty, and dedupe within ``DEDUPE_WINDOW``."""
    d = recipe.data
    spec = getattr(d, key.split(".", 1)[1])
    window = Window(DEDUPE_WINDOW) if d.clean.dedupe else None
    n = 0
    for chunk in records(recipe, key):
        if not chunk:
            continue
        if not n:
            check_columns(recipe, chunk, spec)
        try:
            mapped = to_examples(recipe, chunk, start=n)
        except DataError as exc:  # "record 7: ..." needs the file it is in
            raise DataError(f"{spec}: {exc.message}", hint=exc.hint) from None
        n += len(chunk)
        for e in mapped:
            counts.read += 1
            if d.clean.strip:
                e = _strip(e)
            if d.clean.drop_empty and _is_empty(e):
                counts.empty += 1
                continue
            h = split_hash(e, d.split.seed)
            if window is not None and not window.add(h):
                counts.duplicate += 1
                continue
            yield e, h
    if not n:
        check_columns(recipe, [], spec)


# --------------------------------------------------------------------------- the scan


@dataclass
class Scan:
    """What the stream's start holds: the sealed splits, a training sample, the labels."""

    test: list[dict]
    validation: list[dict]
    sample: list[dict]  # the first MEASURE training-bucket examples
    labels: list[str] | None
    held: set  # hashes of examples read from test_path / validation_path
    counts: Counts
    caps: dict = field(default_factory=dict)


def caps(recipe) -> tuple[int, int]:
    d = recipe.data
    return (
        d.max_test_examples or DEFAULT_MAX_TEST,
        d.max_validation_examples or DEFAULT_MAX_VALIDATION,
    )


def _explicit(recipe, key: str, cap: int, held: set, counts: Counts, wanted) -> list[dict]:
    """The first ``cap`` examples of a split's own file (none already ``held``)."""
    out = []
    for e, h in examples(recipe, counts, key):
        if wanted is not None and e["label"] not in wanted:
            counts.unlisted_label += 1
            continue
        if h in held:
            counts.shared_between_splits += 1
            continue
        held.add(h)
        out.append(e)
        if len(out) >= cap:
            break
    return out


def scan(recipe) -> Scan:
    """Read the stream's start until the test and validation caps and the training sample are
    full (or the source ends): about max(cap / fraction) examples, never the whole corpus."""
    d = recipe.data
    counts = Counts()
    classify = recipe.task == "classification"
    wanted = set(d.labels) if (classify and d.labels) else None
    max_test, max_val = caps(recipe)
    held: set = set()
    test = (
        _explicit(recipe, "data.test_path", max_test, held, counts, wanted) if d.test_path else []
    )
    validation = (
        _explicit(recipe, "data.validation_path", max_val, held, counts, wanted)
        if d.validation_path
        else []
    )
    t, v = fractions(recipe)
    need = {"test": max_test if t > 0 else 0, "validation": max_val if v > 0 else 0}
    got = {"test": test if t > 0 else [], "validation": validation if v > 0 else []}
    seen = {"test": set(), "validation": set()}  # exact dedupe of the collected splits
    sample: list[dict] = []
    for e, h in examples(recipe, counts):
        if wanted is not None and e["label"] not in wanted:
            counts.unlisted_label += 1
            continue
        if h in held:
            counts.shared_between_splits += 1
            continue
        which = split_of(h, t, v)
        if which == "train":
            if len(sample) < MEASURE:
                sample.append(e)
        elif len(got[which]) < need[which] and h not in seen[which]:
            seen[which].add(h)
            got[which].append(e)
        if len(sample) >= MEASURE and all(len(got[k]) >= need[k] for k in need):
            break
    labels = None
    if classify:
        labels = list(d.labels) if d.labels else _discovered(recipe, test + validation + sample)
    if not sample:
        raise DataError(
            f"no training example in the start of the stream {d.path} "
            f"({counts.read} read, {counts.empty} empty, {counts.duplicate} duplicates)",
            hint="add data, or lower data.split fractions",
        )
    if not test:
        raise DataError(
            "the test split is empty: no test-bucket example in the stream",
            hint="set data.split.test above 0, or data.test_path",
        )
    return Scan(
        test,
        validation,
        sample,
        labels,
        held,
        counts,
        {"test": max_test, "validation": max_val},
    )


def _discovered(recipe, found: list[dict]) -> list[str]:
    labels = sorted({e["label"] for e in found})
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least 2 labels; the first {len(found)} examples of the "
            f"stream have {len(labels)}: {labels}",
            hint="check data.label_column, or list every label in data.labels",
        )
    if len(labels) > 1000:
        raise DataError(
            f"{len(labels)} distinct labels: {recipe.data.label_col!r} does not look like a label "
            "column",
            hint="check data.label_column, or list the labels to keep in data.labels",
        )
    return labels


def train_examples(recipe, labels, held: set, counts: Counts | None = None) -> Iterator[dict]:
    """One pass over the stream's training bucket, in stream order (``max_train_examples``: the
    first N of it). A label outside ``labels`` is dropped when data.labels lists them, else a
    DataError: the labels were discovered from the stream's start."""
    d = recipe.data
    counts = counts or Counts()
    t, v = fractions(recipe)
    label_set = set(labels) if labels is not None else None
    n = 0
    for e, h in examples(recipe, counts):
        if h in held or split_of(h, t, v) != "train":
            continue
        if label_set is not None and e["label"] not in label_set:
            if d.labels:
                counts.unlisted_label += 1
                continue
            raise DataError(
                f"label {e['label']!r} (training example {n + 1} of the stream) is not among the "
                f"labels found in the stream's first {MEASURE:,} training examples: "
                f"{', '.join(labels)}",
                hint="list every label in data.labels (examples with other labels are then "
                "dropped)",
            )
        yield e
        n += 1
        if d.max_train_examples and n >= d.max_train_examples:
            return


# --------------------------------------------------------------------------- streamed batches


def _params(recipe, label2id) -> dict:
    d = recipe.data
    if recipe.task == "classification":
        return {"L": d.max_length, "label2id": label2id}
    return causal_params(d)


class StreamedBatches:
    """The training micro-batches, tokenized on the fly: a pure function of the recipe and the
    source, so every rank computes the same sequence and ``--resume`` replays it."""

    def __init__(self, recipe, tokenizer, labels, held: set, packed: bool):
        self.recipe, self.tokenizer, self.held, self.packed = recipe, tokenizer, held, packed
        self.labels = labels
        label2id = {lab: i for i, lab in enumerate(labels or [])}
        self._fn = partial(
            features_batch,
            task=recipe.task,
            tokenizer=tokenizer,
            params=_params(recipe, label2id),
        )
        self.buffer = max(recipe.data.shuffle_buffer, 2)
        self.passes = 0  # passes started over the source

    def _features(self) -> Iterator[list[tuple]]:
        """Batches of (input_ids, labels, length) per kept example, one pass in stream order."""
        chunk: list[dict] = []
        for e in train_examples(self.recipe, self.labels, self.held):
            chunk.append(e)
            if len(chunk) >= BATCH:
                yield self._tokenize(chunk)
                chunk = []
        if chunk:
            yield self._tokenize(chunk)

    def _tokenize(self, chunk: list[dict]) -> list[tuple]:
        cols = {c: [e[c] for e in chunk] for c in chunk[0]}
        out = self._fn(cols)
        seq = self.recipe.task != "classification"
        return [
            (
                np.asarray(ids, np.int32),
                np.asarray(lab, np.int32) if seq else int(lab),
                n,
            )
            for ids, lab, n, keep in zip(
                out["input_ids"], out["labels"], out["length"], out["keep"], strict=True
            )
            if keep
        ]

    def _cut(self, part: list[tuple], rng, last: bool) -> tuple[list[list[tuple]], list[tuple]]:
        """``part`` grouped by length and cut into micro-batches (train.batch_size examples, or
        train.batch_tokens), their order shuffled; unless ``last``, a final short micro-batch
        is handed back to the buffer."""
        t = self.recipe.train
        if t.group_by_length:
            part = sorted(part, key=lambda f: -f[2])
        batches: list[list[tuple]] = []
        if t.batch_tokens is None:
            batches = [part[s : s + t.batch_size] for s in range(0, len(part), t.batch_size)]
            short = batches and len(batches[-1]) < t.batch_size
        else:
            cur: list[tuple] = []
            longest = used = 0
            for f in part:
                k = f[2]
                cost = used + k if self.packed else (len(cur) + 1) * padded_width(max(longest, k))
                if cur and cost > t.batch_tokens:
                    batches.append(cur)
                    cur, longest, used = [], 0, 0
                cur.append(f)
                longest, used = max(longest, k), used + k
            if cur:
                batches.append(cur)
            short = len(batches) > 1
        back: list[tuple] = []
        if short and not last:
            back = batches.pop()
        order = rng.permutation(len(batches)) if t.group_by_length else range(len(batches))
        return [batches[i] for i in order], back

    def _pass(self, epoch: int) -> Iterator[list[tuple]]:
        """One pass's micro-batches: the buffer fills to ``shuffle_buffer`` examples, a seeded
        random half of it is drawn, grouped and cut, the rest stays to mix with what comes next."""
        rng = np.random.default_rng([self.recipe.train.seed, epoch])
        buf: list[tuple] = []
        for feats in self._features():
            buf.extend(feats)
            while len(buf) >= self.buffer:
                take = np.zeros(len(buf), bool)
                take[rng.choice(len(buf), size=self.buffer // 2, replace=False)] = True
                out = [f for f, x in zip(buf, take, strict=True) if x]
                buf = [f for f, x in zip(buf, take, strict=True) if not x]
                batches, back = self._cut(out, rng, last=False)
                buf.extend(back)
                yield from batches
        if buf:
            buf = [buf[i] for i in rng.permutation(len(buf))]
            batches, _ = self._cut(buf, rng, last=True)
            yield from batches

    def global_batches(self) -> Iterator[list[tuple]]:
        """Every micro-batch of every rank, pass after pass, without end."""
        epoch = 0
        while True:
            self.passes = epoch + 1
            empty = True
            for b in self._pass(epoch):
                empty = False
                yield b
            if empty:
                raise DataError(f"the stream {self.recipe.data.path} holds no training example")
            epoch += 1

    def micro_batches(self, rank: int = 0, world: int = 1, skip: int = 0) -> Iterator[list[dict]]:
        """This rank's micro-batches (every ``world``-th from ``rank``) as feature dicts, the
        first ``skip`` of them read and tokenized but not handed on (``--resume``)."""
        mine = 0
        for i, b in enumerate(self.global_batches()):
            if i % world != rank:
                continue
            mine += 1
            if mine <= skip:
                continue
            yield [
                {
                    "input_ids": ids.tolist(),
                    "attention_mask": [1] * n,
                    "labels": lab.tolist() if isinstance(lab, np.ndarray) else lab,
                }
                for ids, lab, n in b
            ]

    def loader(self, accelerator, collate_fn, skip: int = 0) -> Iterator[dict]:
        """The loop's loader: this rank's collated micro-batches on its device."""
        device = accelerator.device
        blocking = device.type != "cuda"
        for feats in self.micro_batches(accelerator.process_index, accelerator.num_processes, skip):
            batch = collate_fn(feats)
            yield {k: v.to(device, non_blocking=not blocking) for k, v in batch.items()}


def steps(t) -> tuple[int, int]:
    """(steps per "epoch", total steps) of a streamed run: max_steps (required) for both, as no
    epoch length is known; eval_every and checkpoint_every default to the run's end."""
    return max(1, t.max_steps or 0), t.max_steps or 0


# --------------------------------------------------------------------------- the data stage


@dataclass(frozen=True)
class Streamed(Tokenized):
    """The training split of a streamed run: ``features`` are the measured sample (what eva
    initialisation reads), ``stream`` yields the real micro-batches."""

    stream: StreamedBatches | None = None
    streamed: bool = True

    def summary(self, max_length: int) -> str:
        s = (
            f"streamed: tokenized as it trains, not cached; its first {len(self.features):,} "
            f"examples measured ({self.tokens:,} tokens"
        )
        if self.truncated:
            s += f", {self.truncated} truncated to {max_length}"
        return s + ")"

    def record(self) -> dict:
        """run.json's entry for the training split."""
        return {
            "streamed": True,
            "measured_examples": len(self.features),
            "measured_tokens": self.tokens,
            "truncated": self.truncated,
            "dropped_no_target": self.dropped_no_target,
        }


def resolve_from_stream(recipe, tokenizer=None, s: Scan | None = None):
    """(recipe with an int max_length, LengthChoice): ``auto`` is chosen from the first
    ``MEASURE`` training examples of the stream (what the printed line says); an explicit value
    wins. For estimate-memory too: a scan, never the whole corpus."""
    from dataclasses import replace

    from ftcli.data.lengths import (
        LengthChoice,
        choose,
        model_position_limit,
        token_lengths,
        with_max_length,
    )

    if recipe.data.max_length != "auto":
        return recipe, LengthChoice(int(recipe.data.max_length), "explicit")
    if tokenizer is None:
        from ftcli.data.chat import recipe_tokenizer

        tokenizer, _, _ = recipe_tokenizer(recipe)
    s = s or scan(recipe)
    label2id = {lab: i for i, lab in enumerate(s.labels or [])}
    lengths = token_lengths(s.sample, recipe, tokenizer, label2id)
    limit = model_position_limit(recipe, tokenizer)
    choice = replace(choose(lengths, False, limit, recipe.train.batch_tokens), streamed=True)
    return with_max_length(recipe, choice.value), choice


def load_streamed(recipe, tokenizer, ui=None):
    """(PreparedData, {split: Tokenized}, note) of a streamed recipe: the scan's test and
    validation splits tokenized as usual, max_length resolved from the training sample, and the
    training split a ``Streamed`` whose micro-batches come from the source as it trains."""
    d = recipe.data
    s = scan(recipe)
    label2id = {lab: i for i, lab in enumerate(s.labels or [])}
    recipe, length = resolve_from_stream(recipe, tokenizer, s)
    tokenized = {
        name: tokenize(rows, recipe, tokenizer, label2id)
        for name, rows in (("validation", s.validation), ("test", s.test))
    }
    sample = tokenize(s.sample, recipe, tokenizer, label2id)
    packed = d.packs(recipe.task, recipe.method.kind)
    stream = StreamedBatches(recipe, tokenizer, s.labels, s.held, packed)
    tokenized["train"] = Streamed(
        sample.features,
        sample.truncated,
        sample.dropped_no_target,
        sample.tokens,
        stream=stream,
    )
    splits = {"validation": s.validation, "test": s.test}
    stats = {
        "source": d.path,
        "streaming": {
            "scanned": s.counts.read,
            "caps": s.caps,
            "measured_train_examples": len(s.sample),
            "dedupe_window": DEDUPE_WINDOW if d.clean.dedupe else None,
            "shuffle_buffer": d.shuffle_buffer,
        },
        "read": s.counts.read,
        "dropped": s.counts.dropped(),
        "sizes": {k: len(v) for k, v in splits.items()},
        "max_length": length.as_dict(),
    }
    if s.labels:
        stats["label_counts"] = {
            k: dict(collections.Counter(e["label"] for e in v)) for k, v in splits.items()
        }
    if d.style != "text" and recipe.task == "causal_lm":
        stats["layout"] = d.style
    note = (
        f"{NOTE}; test and validation: the first {s.caps['test']:,} / {s.caps['validation']:,} "
        f"of their hash buckets, from {s.counts.read:,} examples scanned"
    )
    return PreparedData(splits, s.labels, stats), tokenized, note
