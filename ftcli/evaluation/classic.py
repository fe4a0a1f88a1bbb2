"""Classification baselines a practitioner would try before fine-tuning, with no neural network:

- ``tfidf``: TF-IDF (word 1-2-grams, sublinear tf) + logistic regression (scikit-learn), fitted on
  the run's own training split; C is chosen on the validation split (accuracy, then log loss);
- ``majority``: always the most frequent training label (its probabilities are the training
  label frequencies, so calibration is measured honestly too).

Both return per-example class probabilities on the sealed test examples, in the run's label order,
so they enter the same paired statistics as the fine-tuned model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ftcli.errors import FtcliError

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def _xy(rows: list[dict], label2id: dict[str, int]) -> tuple[list[str], np.ndarray]:
    return [r["text"] for r in rows], np.asarray([label2id[r["label"]] for r in rows], dtype=int)


def majority_rate(train: list[dict], test_labels: list[int], label2id: dict[str, int]) -> dict:
    """The most frequent training label and how often it is right on the test examples."""
    counts = Counter(label2id[r["label"]] for r in train)
    top = max(sorted(counts), key=lambda k: counts[k])
    y = np.asarray(test_labels)
    return {
        "label_id": int(top),
        "train_count": int(counts[top]),
        "train_examples": len(train),
        "test_accuracy": float((y == top).mean()) if len(y) else float("nan"),
    }


def majority_probabilities(train: list[dict], n_test: int, labels: list[str]) -> tuple[list, dict]:
    if not train:
        raise FtcliError("--baseline majority needs the run's training split, which is empty")
    label2id = {lab: i for i, lab in enumerate(labels)}
    counts = Counter(label2id[r["label"]] for r in train)
    prior = np.asarray([counts.get(i, 0) for i in range(len(labels))], dtype=float) / len(train)
    top = int(prior.argmax())
    info = {
        "label": labels[top],
        "train_count": int(counts[top]),
        "train_examples": len(train),
    }
    return [prior.tolist()] * n_test, info


def _full_probs(model, x, n_labels: int) -> np.ndarray:
    """predict_proba in the run's label order (labels missing from training get 0)."""
    p = model.predict_proba(x)
    out = np.zeros((p.shape[0], n_labels))
    out[:, model.classes_] = p
    return out


def tfidf_probabilities(
    train: list[dict], validation: list[dict], test_texts: list[str], labels: list[str], seed: int
) -> tuple[list, dict]:
    """Fit TF-IDF + logistic regression on ``train`` (C chosen on ``validation``); test probabilities."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    label2id = {lab: i for i, lab in enumerate(labels)}
    tx, ty = _xy(train, label2id)
    if len(set(ty.tolist())) < 2:
        raise FtcliError(
            "--baseline tfidf needs at least two labels in the training split",
            hint="use --baseline majority",
        )
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    xtr = vec.fit_transform(tx)
    vx, vy = _xy(validation, label2id)
    xva = vec.transform(vx) if vx else None
    tried = []
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xtr, ty)
        if xva is None:
            tried.append({"C": c})
            continue
        p = _full_probs(model, xva, len(labels))
        acc = float((p.argmax(1) == vy).mean())
        loss = float(log_loss(vy, p, labels=list(range(len(labels)))))
        tried.append({"C": c, "val_accuracy": acc, "val_log_loss": loss})
        if best is None or (acc, -loss) > (best[1], -best[2]):
            best = (model, acc, loss, c)
    if best is None:  # no validation split: the library default
        c = 1.0
        best = (
            LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xtr, ty),
            None,
            None,
            c,
        )
    model, acc, _, c = best
    probs = _full_probs(model, vec.transform(test_texts), len(labels))
    info = {
        "C": c,
        "chosen_by": "validation accuracy (then log loss)"
        if xva is not None
        else "default (no validation split)",
        "validation_accuracy": acc,
        "grid": tried,
        "train_examples": len(tx),
        "validation_examples": len(vx),
        "vocabulary": len(vec.vocabulary_),
        "features": "word 1-2-grams, sublinear tf, l2-normalised",
    }
    return probs.tolist(), info
