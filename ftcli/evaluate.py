"""evaluate(): score a model on the sealed test split.

Classification: accuracy and macro-F1 (scikit-learn), from per-example class probabilities.
Causal LM: loss and perplexity on completion tokens, from per-example summed losses.
The per-example outputs are kept so that a comparison (``ftcli eval --baseline``) can pair them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ftcli.data import IGNORE_INDEX


@dataclass(frozen=True)
class EvalReport:
    """Headline metrics on one split, and the per-example outputs they came from."""

    task: str
    split: str
    n: int
    metrics: dict
    per_example: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"task": self.task, "split": self.split, "n": self.n, "metrics": self.metrics}


def _batches(features: list[dict], batch_size: int):
    # sort by length so padding stays small; the caller gets results back in the original order
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def class_probabilities(model, features: list[dict], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Softmax probabilities per example, in the order of ``features``."""
    import torch

    from ftcli.train import collate

    probs: list = [None] * len(features)
    model.eval()
    with torch.no_grad():
        for idx in _batches(features, batch_size):
            batch = collate([features[i] for i in idx], pad_id)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            p = torch.softmax(out.logits.float(), dim=-1).cpu().tolist()
            for i, row in zip(idx, p, strict=True):
                probs[i] = row
    return probs


def token_losses(model, features: list[dict], pad_id: int, batch_size: int, device) -> list[tuple[float, int]]:
    """(summed loss, number of target tokens) per example, in the order of ``features``."""
    import torch
    import torch.nn.functional as F

    from ftcli.train import collate

    out_rows: list = [None] * len(features)
    model.eval()
    with torch.no_grad():
        for idx in _batches(features, batch_size):
            batch = collate([features[i] for i in idx], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            labels = batch["labels"].to(device)[:, 1:]
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            sums = ce.sum(dim=1).cpu().tolist()
            counts = (labels != IGNORE_INDEX).sum(dim=1).cpu().tolist()
            for i, s, c in zip(idx, sums, counts, strict=True):
                out_rows[i] = (s, c)
    return out_rows


def classification_metrics(y_true: list[int], y_pred: list[int], n_labels: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_labels)), zero_division=0)),
    }


def lm_metrics(rows: list[tuple[float, int]]) -> dict:
    total = sum(s for s, _ in rows)
    tokens = sum(c for _, c in rows)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 50 else float("inf"),
            "target_tokens": tokens}


def evaluate(task: str, model, tokenizer, features: list[dict], labels: list[str] | None, batch_size: int,
             device, split: str = "test") -> EvalReport:
    """Score ``model`` on tokenized ``features`` of one split."""
    if task == "classification":
        probs = class_probabilities(model, features, tokenizer.pad_token_id, batch_size, device)
        y_true = [f["labels"] for f in features]
        y_pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
        metrics = classification_metrics(y_true, y_pred, len(labels or []))
        per = [{"label": t, "pred": p, "probs": pr} for t, p, pr in zip(y_true, y_pred, probs, strict=True)]
    else:
        rows = token_losses(model, features, tokenizer.pad_token_id, batch_size, device)
        metrics = lm_metrics(rows)
        per = [{"loss_sum": s, "tokens": c} for s, c in rows]
    return EvalReport(task, split, len(features), metrics, per)
