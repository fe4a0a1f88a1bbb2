"""Where the models fail: regressions (baseline right, fine-tuned wrong), persistent failures,
the most confused label pairs, and errors by input length; and the per-example predictions file."""

from __future__ import annotations

import numpy as np

TOP = 10
SNIPPET = 300


def _snip(text: str) -> str:
    return text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…"


def length_bins(lengths: list[int], bins: int = 5) -> np.ndarray:
    """Bin edges by length quantiles (fewer bins when lengths repeat)."""
    edges = np.unique(np.quantile(np.asarray(lengths, float), np.linspace(0, 1, bins + 1)).round())
    return edges if len(edges) > 1 else np.array([edges[0], edges[0] + 1])


def _by_length(lengths: list[int], values: dict[str, np.ndarray]) -> list[dict]:
    edges = length_bins(lengths)
    L = np.asarray(lengths)
    which = np.clip(np.searchsorted(edges, L, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        m = which == b
        if not m.any():
            continue
        row = {"tokens": f"{int(edges[b])}-{int(edges[b + 1])}", "examples": int(m.sum())}
        row.update({k: float(np.nanmean(v[m])) for k, v in values.items()})
        rows.append(row)
    return rows


def classification_failures(
    texts: list[str], y_true, probs_base, probs_tuned, labels: list[str], lengths: list[int]
) -> tuple[dict, list[dict]]:
    """(summary for the report, one prediction row per test example)."""
    y = np.asarray(y_true)
    pb, pt = np.asarray(probs_base), np.asarray(probs_tuned)
    bp, tp = pb.argmax(1), pt.argmax(1)
    br, tr = bp == y, tp == y
    outcome = np.where(
        br & tr, "both right", np.where(br, "regression", np.where(tr, "fixed", "both wrong"))
    )
    rows = []
    for i in range(len(y)):
        rows.append(
            {
                "index": i,
                "text": texts[i],
                "label": labels[y[i]],
                "length_tokens": int(lengths[i]),
                "baseline": {
                    "pred": labels[bp[i]],
                    "confidence": float(pb[i].max()),
                    "probs": pb[i].round(6).tolist(),
                },
                "tuned": {
                    "pred": labels[tp[i]],
                    "confidence": float(pt[i].max()),
                    "probs": pt[i].round(6).tolist(),
                },
                "outcome": str(outcome[i]),
            }
        )

    def worst(mask) -> list[dict]:
        idx = sorted(np.flatnonzero(mask), key=lambda i: -pt[i].max())[:TOP]
        return [
            {
                "index": int(i),
                "text": _snip(texts[i]),
                "label": labels[y[i]],
                "baseline": labels[bp[i]],
                "tuned": labels[tp[i]],
                "tuned_confidence": round(float(pt[i].max()), 4),
            }
            for i in idx
        ]

    k = len(labels)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, tp), 1)
    pairs = [(int(cm[a, b]), a, b) for a in range(k) for b in range(k) if a != b and cm[a, b]]
    pairs.sort(reverse=True)
    confused = [
        {
            "label": labels[a],
            "predicted": labels[b],
            "count": c,
            "share_of_label": round(c / max(1, cm[a].sum()), 4),
        }
        for c, a, b in pairs[:5]
    ]
    summary = {
        "counts": {
            o: int((outcome == o).sum())
            for o in ("both right", "fixed", "regression", "both wrong")
        },
        "regressions": worst(outcome == "regression"),
        "persistent": worst(outcome == "both wrong"),
        "confused_pairs": confused,
        "by_length": _by_length(
            lengths,
            {"error_rate_baseline": (~br).astype(float), "error_rate_tuned": (~tr).astype(float)},
        )
        if len(y)
        else [],
    }
    return summary, rows


def lm_failures(
    prompts: list[str],
    references: list[str],
    lengths: list[int],
    loss_base: list[float],
    loss_tuned: list[float],
    answers_base: list[dict],
    answers_tuned: list[dict],
    table_base: dict,
    table_tuned: dict,
) -> tuple[dict, list[dict]]:
    """Failures of a causal LM: per-token loss for every example; answers for the generated ones."""
    lb, lt = np.asarray(loss_base, float), np.asarray(loss_tuned, float)
    rows = []
    for i in range(len(lb)):
        row = {
            "index": i,
            "prompt": prompts[i],
            "reference": references[i],
            "length_tokens": int(lengths[i]),
            "baseline": {"loss_per_token": float(lb[i])},
            "tuned": {"loss_per_token": float(lt[i])},
        }
        if i < len(answers_tuned):
            for side, ans, tab in (
                ("baseline", answers_base, table_base),
                ("tuned", answers_tuned, table_tuned),
            ):
                row[side].update(
                    answer=ans[i]["answer"],
                    stopped=ans[i]["stopped"],
                    answer_tokens=ans[i]["tokens"],
                    exact_match=tab["exact_match"][i],
                    token_f1=tab["token_f1"][i],
                    rouge_l=tab["rouge_l"][i],
                )
        rows.append(row)
    g = len(answers_tuned)
    fb = np.asarray(table_base.get("token_f1", []), float)
    ft = np.asarray(table_tuned.get("token_f1", []), float)

    def answer_row(i: int) -> dict:
        return {
            "index": i,
            "prompt": _snip(prompts[i]),
            "reference": _snip(references[i]),
            "baseline": _snip(answers_base[i]["answer"]),
            "tuned": _snip(answers_tuned[i]["answer"]),
            "token_f1_baseline": round(float(fb[i]), 4),
            "token_f1_tuned": round(float(ft[i]), 4),
        }

    reg = sorted((i for i in range(g) if ft[i] < fb[i]), key=lambda i: ft[i] - fb[i])[:TOP]
    persistent = sorted((i for i in range(g) if fb[i] < 0.5 and ft[i] < 0.5), key=lambda i: ft[i])[
        :TOP
    ]
    worse_loss = sorted((i for i in range(len(lb)) if lt[i] > lb[i]), key=lambda i: lb[i] - lt[i])[
        :TOP
    ]
    summary = {
        "counts": {
            "examples": len(lb),
            "loss_worse": int((lt > lb).sum()),
            "loss_better": int((lt < lb).sum()),
            "generated": g,
            "answer_f1_worse": int((ft < fb).sum()) if g else 0,
            "answer_f1_better": int((ft > fb).sum()) if g else 0,
            "both_below_half_f1": int(((fb < 0.5) & (ft < 0.5)).sum()) if g else 0,
        },
        "regressions": [answer_row(i) for i in reg],
        "persistent": [answer_row(i) for i in persistent],
        "loss_regressions": [
            {
                "index": i,
                "prompt": _snip(prompts[i]),
                "reference": _snip(references[i]),
                "loss_baseline": round(float(lb[i]), 4),
                "loss_tuned": round(float(lt[i]), 4),
            }
            for i in worse_loss
        ],
        "confused_pairs": [],
        "by_length": _by_length(
            lengths, {"loss_per_token_baseline": lb, "loss_per_token_tuned": lt}
        ),
    }
    return summary, rows
