"""Per-example outputs of one model on a split: the pipeline's evaluate stage (``evaluate``) and
the raw material of a comparison (``score_model``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ftcli.data.tokenize import prompt_and_target, tokenize
from ftcli.data.windows import by_document
from ftcli.evaluation.metrics import answer_scores, classification_summary, lm_summary
from ftcli.forward import class_probabilities, generate_answers, token_losses
from ftcli.recipe import Recipe


@dataclass(frozen=True)
class EvalReport:
    """Headline metrics on one split (the vocabulary of ``evaluation.metrics``)."""

    task: str
    split: str
    n: int
    metrics: dict
    by_source: dict | None = None  # a mixture: source name -> {"n", metrics...}

    def as_dict(self) -> dict:
        out = {"task": self.task, "split": self.split, "n": self.n, "metrics": self.metrics}
        if self.by_source is not None:
            out["by_source"] = self.by_source
        return out


def evaluate(
    task: str,
    model,
    tokenizer,
    features: list[dict],
    labels: list[str] | None,
    batch_size: int,
    device,
    split: str = "test",
    groups: list[str] | None = None,
) -> EvalReport:
    """Score ``model`` on tokenized ``features`` of one split: the pipeline's evaluate stage.
    Windows of one document (data.long_documents: windows) are scored as that one document.
    ``groups``: each feature's source (a mixture); the same metrics per source, from one pass."""
    features = by_document(features)

    def summary(keep: list[int] | None) -> dict:
        pick = (lambda xs: xs) if keep is None else (lambda xs: [xs[i] for i in keep])
        if task == "classification":
            return classification_summary(
                pick([f["labels"] for f in features]), pick(probs), labels or []
            )
        return lm_summary(pick([s for s, _ in rows]), pick([c for _, c in rows]))

    if task == "classification":
        probs = class_probabilities(model, features, tokenizer.pad_token_id, batch_size, device)
    else:
        rows = token_losses(model, features, tokenizer.pad_token_id, batch_size, device)
    by_source = None
    if groups is not None:
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        by_source = {g: {"n": len(ix), **summary(ix)} for g, ix in members.items()}
    return EvalReport(task, split, len(features), summary(None), by_source)


def source_groups(examples) -> list[str] | None:
    """Each example's source, where a split holds examples of more than one (a mixture)."""
    table = getattr(examples, "table", None)
    if table is not None:
        if "source" not in table.column_names:
            return None
        names = table.column("source").to_pylist()
    else:
        names = [e.get("source") for e in examples]
    return names if len(set(names) - {None}) > 1 else None


@dataclass
class Scored:
    """What one model did on each test example (classification: probabilities; causal LM: summed
    completion loss and target tokens, and greedy answers on the first ``generated`` examples)."""

    name: str
    task: str
    probs: list[list[float]] | None = None
    loss_sums: list[float] | None = None
    tokens: list[int] | None = None
    answers: list[dict] = field(default_factory=list)


def tokenize_aligned(
    examples: list[dict], recipe: Recipe, tokenizer, label2id
) -> tuple[list[dict], list[int]]:
    """Features and the indices of the examples they came from (causal-LM tokenization drops
    examples whose answer was cut off entirely; the rest must stay paired with their text)."""
    feats = by_document(tokenize(examples, recipe, tokenizer, label2id).features)
    if recipe.task == "classification":
        # an empty text can tokenize to nothing (tokenizers that add no special tokens): a model
        # cannot read zero tokens, so it reads the start token alone, as for any empty document
        start = next(
            (
                t
                for t in (
                    tokenizer.bos_token_id,
                    tokenizer.cls_token_id,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                )
                if t is not None
            ),
            0,
        )
        feats = [
            f if f["input_ids"] else {**f, "input_ids": [start], "attention_mask": [1]}
            for f in feats
        ]
    if len(feats) == len(examples):
        return feats, list(range(len(examples)))
    kept, out = [], []
    for i, e in enumerate(examples):
        f = tokenize([e], recipe, tokenizer, label2id).features
        if f:
            kept.append(i)
            out.append(f[0])
    return out, kept


def prompt_parts(tokenizer, example: dict) -> tuple[str, str, bool]:
    """(prompt, reference, add_special_tokens) for generation, as training tokenized the example."""
    prompt, ref = prompt_and_target(tokenizer, example)
    return prompt, ref, "messages" not in example


def generation_examples(recipe: Recipe, examples: list[dict], kept: list[int]) -> list[int]:
    """Which test examples are answered by generation: the first ``eval.generate_examples`` that
    have a prompt (plain-text data has none, so nothing is generated for it)."""
    if recipe.task != "causal_lm" or recipe.data.style == "text":
        return []
    return kept[: recipe.eval.generate_examples]


def score_model(
    name: str,
    recipe: Recipe,
    model,
    tokenizer,
    examples: list[dict],
    feats: list[dict],
    kept: list[int],
    device,
    generate: bool = True,
) -> Scored:
    """Run ``model`` over the test features (and generate answers for causal LMs)."""
    bs = recipe.eval.batch_size
    if recipe.task == "classification":
        return Scored(
            name,
            recipe.task,
            probs=class_probabilities(model, feats, tokenizer.pad_token_id, bs, device),
        )
    rows = token_losses(model, feats, tokenizer.pad_token_id, bs, device)
    scored = Scored(name, recipe.task, loss_sums=[s for s, _ in rows], tokens=[c for _, c in rows])
    if generate:
        scored.answers = answer_examples(
            model,
            tokenizer,
            recipe,
            [examples[i] for i in generation_examples(recipe, examples, kept)],
            device,
        )
    return scored


def answer_examples(model, tokenizer, recipe: Recipe, examples: list[dict], device) -> list[dict]:
    if not examples:
        return []
    parts = [prompt_parts(tokenizer, e) for e in examples]
    return generate_answers(
        model,
        tokenizer,
        [p for p, _, _ in parts],
        parts[0][2],
        recipe.eval.max_new_tokens,
        recipe.eval.batch_size,
        device,
        recipe.data.max_length,
    )


def answer_table(scored: Scored, references: list[str]) -> dict[str, list[float]]:
    """Per-example answer metrics of a model's generations (the inputs of the paired tests)."""
    preds = [a["answer"] for a in scored.answers]
    table = answer_scores(preds, references[: len(preds)])
    table["stop_rate"] = [float(a["stopped"]) for a in scored.answers]
    table["answer_tokens"] = [float(a["tokens"]) for a in scored.answers]
    return table


def per_token_loss(scored: Scored) -> list[float]:
    return [
        s / c if c else math.nan
        for s, c in zip(scored.loss_sums or [], scored.tokens or [], strict=True)
    ]
