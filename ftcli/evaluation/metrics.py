"""Task metrics: scikit-learn for classification, ftcli's shipped ``evaluate`` modules for answers.

Each headline metric also has a vectorized form ``f(rows, pos)`` over index arrays, so the paired
bootstrap and permutation tests (``stats``) can recompute it on thousands of resamples at once:
``rows`` pick per-example outputs from a table that stacks [baseline; fine-tuned], ``pos`` picks
the matching references. The vectorized forms are tested against the scalar ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

ECE_BINS = 15


# --------------------------------------------------------------------------- metric modules


@functools.cache
def load_metric(name: str):
    """One of ftcli's shipped ``evaluate`` modules (ftcli/metrics/<name>/<name>.py), loaded by path."""
    import evaluate

    folder = resources.files("ftcli.metrics") / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"ftcli metric module {name!r} is missing from the installed package ({folder})"
        )
    return evaluate.load(str(folder))


def answer_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example exact match, token F1 and ROUGE-L of generated answers."""
    if not predictions:
        return {"exact_match": [], "token_f1": [], "rouge_l": []}
    tm = load_metric("text_match").compute(predictions=predictions, references=references)
    rl = load_metric("rouge_l").compute(predictions=predictions, references=references)
    return {
        "exact_match": tm["per_example_exact_match"],
        "token_f1": tm["per_example_token_f1"],
        "rouge_l": rl["per_example_rouge_l"],
    }


# --------------------------------------------------------------------------- classification


def _per_row_bincount(keys, weights, size: int):
    """Row-wise bincount of integer ``keys`` (any leading shape, last axis = examples) -> (..., size)."""
    keys = np.asarray(keys)
    lead = keys.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    flat = (np.arange(rows).reshape(-1, 1) * size + keys.reshape(rows, -1)).ravel()
    w = None if weights is None else np.broadcast_to(weights, keys.shape).reshape(rows, -1).ravel()
    counts = np.bincount(flat, weights=w, minlength=rows * size)
    return counts.reshape(*lead, size) if lead else counts


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS):
    """ECE (Guo et al. 2017): the share-weighted mean over equal-width confidence bins of
    |accuracy - mean confidence|. Vectorized over any leading batch shape (last axis = examples)."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    n = confidence.shape[-1]
    if n == 0:
        return float("nan")
    idx = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gap = _per_row_bincount(idx, correct - confidence, bins)
    return np.abs(gap).sum(axis=-1) / n


def classification_report(y_true: list[int], probs: list[list[float]], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix, ECE, log loss."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
    )

    k = len(labels)
    p = np.asarray(probs, dtype=float)
    y = np.asarray(y_true, dtype=int)
    pred = p.argmax(axis=1)
    ids = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=ids, zero_division=0)
    conf = p.max(axis=1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=ids, zero_division=0)),
        "calibration_error": float(expected_calibration_error(conf, pred == y)),
        "log_loss": float(log_loss(y, np.clip(p, 1e-12, 1.0), labels=ids)),
        "per_class": {
            labels[i]: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in ids
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
        "majority_rate": float(np.bincount(y, minlength=k).max() / len(y))
        if len(y)
        else float("nan"),
    }


CLASSIFICATION_SUMMARY = ("accuracy", "macro_f1")


def classification_summary(y_true: list[int], probs: list[list[float]], labels: list[str]) -> dict:
    """The headline subset of ``classification_report`` that run.json records."""
    report = classification_report(y_true, probs, labels)
    return {k: report[k] for k in CLASSIFICATION_SUMMARY}


def macro_f1_vec(pred, true, n_labels: int):
    """Macro-F1 over the last axis, as sklearn's f1_score(average='macro', zero_division=0)."""
    k = n_labels
    cm = _per_row_bincount(np.asarray(true) * k + np.asarray(pred), None, k * k)
    cm = cm.reshape(*cm.shape[:-1], k, k)  # [..., true, pred]
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(axis=-1) + cm.sum(axis=-2)  # (tp + fn) + (tp + fp)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(axis=-1)


# --------------------------------------------------------------------------- headline metrics


@dataclass(frozen=True)
class Headline:
    """One headline metric: how to recompute it on resamples and how to read it.

    ``fn(rows, pos)`` -> value along the last axis; ``better``: +1 higher is better, -1 lower is,
    0 neutral (a description, not a goal). ``test``: "mcnemar" when the metric is the mean of a
    per-example 0/1 outcome (then ``binary`` holds that table), else "permutation".
    """

    name: str
    fn: Callable
    better: int
    test: str
    binary: np.ndarray | None = None
    n: int = 0


def classification_headlines(y_true, probs_base, probs_tuned, n_labels: int) -> list[Headline]:
    y = np.asarray(y_true, dtype=int)
    pb, pt = np.asarray(probs_base, dtype=float), np.asarray(probs_tuned, dtype=float)
    pred = np.concatenate([pb.argmax(1), pt.argmax(1)])
    conf = np.concatenate([pb.max(1), pt.max(1)])
    correct = (pred == np.concatenate([y, y])).astype(float)
    n = len(y)
    return [
        Headline(
            "accuracy",
            lambda rows, pos: (pred[rows] == y[pos]).mean(axis=-1),
            +1,
            "mcnemar",
            correct,
            n,
        ),
        Headline(
            "macro_f1",
            lambda rows, pos: macro_f1_vec(pred[rows], y[pos], n_labels),
            +1,
            "permutation",
            n=n,
        ),
        Headline(
            "calibration_error",
            lambda rows, pos: expected_calibration_error(conf[rows], pred[rows] == y[pos]),
            -1,
            "permutation",
            n=n,
        ),
    ]


def lm_loss_headlines(loss_sums_base, loss_sums_tuned, tokens) -> list[Headline]:
    """Completion loss (token-weighted mean cross-entropy) and perplexity."""
    s = np.concatenate([np.asarray(loss_sums_base, float), np.asarray(loss_sums_tuned, float)])
    c = np.asarray(tokens, dtype=float)
    n = len(c)

    def loss(rows, pos):
        return s[rows].sum(axis=-1) / c[pos].sum(axis=-1)

    return [
        Headline("completion_loss", loss, -1, "permutation", n=n),
        Headline(
            "perplexity",
            lambda rows, pos: np.exp(np.minimum(loss(rows, pos), 50.0)),
            -1,
            "permutation",
            n=n,
        ),
    ]


def generation_headlines(base: dict[str, list], tuned: dict[str, list]) -> list[Headline]:
    """Answer metrics on the generated subset: exact match, token F1, ROUGE-L, EOS share, length."""
    out = []
    spec = [
        ("exact_match", +1, "mcnemar"),
        ("token_f1", +1, "permutation"),
        ("rouge_l", +1, "permutation"),
        ("stop_rate", +1, "mcnemar"),
        ("answer_tokens", 0, "permutation"),
    ]
    for name, better, test in spec:
        table = np.concatenate([np.asarray(base[name], float), np.asarray(tuned[name], float)])
        n = len(base[name])
        out.append(
            Headline(
                name,
                (lambda t: lambda rows, pos: t[rows].mean(axis=-1))(table),
                better,
                test,
                table if test == "mcnemar" else None,
                n,
            )
        )
    return out


def lm_summary(loss_sums: list[float], tokens: list[int]) -> dict:
    total, count = float(sum(loss_sums)), int(sum(tokens))
    loss = total / count if count else float("nan")
    return {
        "completion_loss": loss,
        "perplexity": math.exp(loss) if count and loss < 50 else float("inf"),
        "target_tokens": count,
    }
