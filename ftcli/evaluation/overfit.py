"""Overfitting from the training curves in ``metrics.jsonl``.

Overfitting here means: validation loss reached its lowest point before the end, then rose by more
than ``tolerance`` (relative) while the training loss kept falling. Also reported: the gap between
validation and training loss at the end, and the step early stopping (``patience`` evaluations
without a new best) would have kept.
"""

from __future__ import annotations

TOLERANCE = 0.05
PATIENCE = 3


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _train_near(train: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Mean training loss logged in (lo, hi]; the last one logged at or before hi if none."""
    window = [v for s, v in train if lo < s <= hi]
    if window:
        return _mean(window)
    before = [v for s, v in train if s <= hi]
    return before[-1] if before else None


def early_stopping_step(
    val: list[tuple[int, float]], patience: int = PATIENCE
) -> tuple[int, int | None]:
    """(kept step, step at which training would have stopped or None) for patience-based stopping."""
    best_v, best_s, wait = float("inf"), val[0][0], 0
    for s, v in val:
        if v < best_v:
            best_v, best_s, wait = v, s, 0
        else:
            wait += 1
            if wait >= patience:
                return best_s, s
    return best_s, None


def detect_overfitting(
    rows: list[dict], tolerance: float = TOLERANCE, patience: int = PATIENCE
) -> dict:
    """Analyse the train/validation curves of one run (rows of metrics.jsonl)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    out: dict = {
        "train_points": len(train),
        "validation_points": len(val),
        "tolerance": tolerance,
        "patience": patience,
        "overfitting": False,
    }
    if len(val) < 3 or not train:
        out["status"] = "not enough points"
        out["message"] = (
            f"{len(val)} validation and {len(train)} training loss points: too few to judge "
            "overfitting (set train.eval_every for more)"
        )
        return out
    best_i = min(range(len(val)), key=lambda i: val[i][1])
    best_step, best_val = val[best_i]
    last_step, last_val = val[-1]
    prev_step = val[best_i - 1][0] if best_i else 0
    train_at_best = _train_near(train, prev_step, best_step)
    train_end = _train_near(train, val[-2][0], last_step)
    rise = (last_val - best_val) / abs(best_val) if best_val else 0.0
    train_fell = (
        train_at_best is not None
        and train_end is not None
        and train_end < train_at_best * (1 - tolerance)
    )
    kept, stopped_at = early_stopping_step(val, patience)
    out.update(
        best_step=best_step,
        best_val_loss=best_val,
        last_step=last_step,
        last_val_loss=last_val,
        val_rise=rise,
        train_loss_at_best=train_at_best,
        train_loss_end=train_end,
        gap_end=(last_val - train_end) if train_end is not None else None,
        early_stopping_step=kept,
        early_stopping_would_stop_at=stopped_at,
    )
    if best_i < len(val) - 1 and rise > tolerance and train_fell:
        out["overfitting"] = True
        out["status"] = "overfitting"
        out["message"] = (
            f"Overfitting: validation loss was lowest at step {best_step} ({best_val:.4f}) and rose "
            f"{100 * rise:.1f}% to {last_val:.4f} by step {last_step}, while training loss kept falling "
            f"({train_at_best:.4f} -> {train_end:.4f}). Early stopping (patience {patience}) would "
            f"have kept step {kept}."
        )
    else:
        out["status"] = "ok"
        why = (
            "validation loss was still at its lowest at the end"
            if best_i == len(val) - 1
            else f"validation loss ended within {100 * tolerance:.0f}% of its best"
            if rise <= tolerance
            else "training loss did not keep falling after validation loss stopped improving"
        )
        out["message"] = (
            f"No overfitting: {why} (best step {best_step}, val {best_val:.4f}; end {last_val:.4f})."
        )
    return out
