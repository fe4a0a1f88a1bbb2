"""``data.augment.paraphrase``: one model-written paraphrase per training example.

The causal LM is loaded and run by ``serve.predictor`` (``Predictor.generate``, greedy, the code
``ftcli predict`` uses), so it is any model predict can load. Filters drop a paraphrase that is
empty or identical to its source (case and spacing aside) and, for classification with a
``filter_model``, one that the filter classifies differently from its source's label. The
pipeline calls this right after ``prepare`` (it needs a model, which data/ does not load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ftcli.data.augment import get_field, rewritable, with_field
from ftcli.data.examples import PreparedData
from ftcli.errors import FtcliError
from ftcli.recipe import Recipe

PROMPT = (
    "Paraphrase the following text. Keep its meaning and tone; reply with the paraphrase only.\n\n"
    "{text}"
)


def clean_answer(text: str) -> str:
    """The first non-empty line of a generation, without wrapping quotes."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def _same(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def add_paraphrases(
    prepared: PreparedData, recipe: Recipe, load_predictor: Callable, ui=None
) -> PreparedData:
    """``prepared`` with paraphrased copies of its original training examples appended (marked
    ``{"augmented": {"op": "paraphrase", "of": i}}``) and counted in ``stats["augmented"]``.
    ``load_predictor`` (serve's, passed in by the pipeline: data/ does not reach up into serve/)
    loads the paraphrasing and filtering models by name."""
    spec = recipe.data.augment
    para = spec.paraphrase
    train = prepared.splits["train"]
    originals = [(i, e) for i, e in enumerate(train) if "augmented" not in e]
    if ui:
        ui.info(f"  paraphrasing {len(originals)} training examples with {para.model}")
    gen = load_predictor(para.model)
    if gen.task != "causal_lm":
        raise FtcliError(
            f"data.augment.paraphrase.model {para.model!r} is a {gen.task} model",
            hint="name a causal (text-generating) language model",
        )
    slots = [(i, w) for i, e in originals for w in rewritable(e, recipe.task, spec.completions)]
    sources = [get_field(train[i], w) for i, w in slots]
    answers = gen.generate(
        [[{"role": "user", "content": PROMPT.format(text=s)}] for s in sources],
        max_new_tokens=para.max_new_tokens,
        batch_size=recipe.eval.batch_size,
    )
    del gen
    rewritten: dict[int, dict] = {}
    identical = 0
    for (i, w), src, ans in zip(slots, sources, answers, strict=True):
        new = clean_answer(ans)
        if not new or _same(new, src):
            identical += 1
            new = src
        rewritten[i] = with_field(rewritten.get(i, train[i]), w, new)
    copies = [
        {**ex, "augmented": {"op": "paraphrase", "of": i}}
        for i, ex in rewritten.items()
        if any(
            not _same(get_field(ex, w), get_field(train[i], w))
            for w in rewritable(ex, recipe.task, spec.completions)
        )
    ]
    label_changed = 0
    if para.filter_model and copies:
        judge = load_predictor(para.filter_model)
        if judge.task != "classification":
            raise FtcliError(
                f"data.augment.paraphrase.filter_model {para.filter_model!r} is not a classifier",
                hint="name a trained classification run or model folder",
            )
        verdicts = judge.classify([c["text"] for c in copies], recipe.eval.batch_size)
        kept = [c for c, v in zip(copies, verdicts, strict=True) if v["label"] == c["label"]]
        label_changed = len(copies) - len(kept)
        copies = kept
    stats = dict(prepared.stats)
    aug = dict(stats.get("augmented") or {"source_examples": len(originals), "added": 0})
    by_op = dict(aug.get("by_op") or {})
    by_op["paraphrase"] = len(copies)
    aug.update(
        added=aug.get("added", 0) + len(copies),
        by_op=by_op,
        paraphrase={
            "model": para.model,
            "max_new_tokens": para.max_new_tokens,
            "filter_model": para.filter_model,
            "dropped_identical": identical,
            "dropped_label_changed": label_changed,
        },
    )
    stats["augmented"] = aug
    splits = {**prepared.splits, "train": train + copies}
    stats["sizes"] = {k: len(v) for k, v in splits.items()}
    if prepared.labels:
        import collections

        stats["label_counts"] = {
            k: dict(collections.Counter(e["label"] for e in v)) for k, v in splits.items()
        }
    return replace(prepared, splits=splits, stats=stats)
