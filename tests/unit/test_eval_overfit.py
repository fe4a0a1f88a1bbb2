"""Overfitting detection on synthetic training curves."""

from __future__ import annotations

from ftcli.evaluation.overfit import detect_overfitting, early_stopping_step


def _rows(train: list[float], val: list[float], every: int = 10) -> list[dict]:
    rows = [{"step": (i + 1) * 2, "loss": v} for i, v in enumerate(train)]
    rows += [{"step": (i + 1) * every, "val_loss": v} for i, v in enumerate(val)]
    return sorted(rows, key=lambda r: r["step"])


def test_u_shaped_validation_with_falling_training_loss_is_overfitting():
    train = [1.0 - 0.018 * i for i in range(50)]  # steps 2..100, falling steadily
    val = [0.9, 0.7, 0.6, 0.55, 0.58, 0.62, 0.66, 0.7, 0.74, 0.8]  # lowest at step 40
    out = detect_overfitting(_rows(train, val))
    assert out["overfitting"] and out["best_step"] == 40 and out["early_stopping_step"] == 40
    assert out["early_stopping_would_stop_at"] == 70  # 3 evaluations without a new best
    assert out["gap_end"] > 0 and "Overfitting" in out["message"] and "step 40" in out["message"]
    assert out["train_loss_end"] < out["train_loss_at_best"]


def test_both_falling_is_not_overfitting():
    out = detect_overfitting(_rows([1.0 - 0.01 * i for i in range(50)], [0.9, 0.8, 0.7, 0.65, 0.6]))
    assert (
        not out["overfitting"]
        and out["best_step"] == 50
        and "still at its lowest" in out["message"]
    )


def test_a_small_wobble_is_not_overfitting():
    out = detect_overfitting(
        _rows([1.0 - 0.01 * i for i in range(50)], [0.9, 0.6, 0.5, 0.51, 0.505])
    )
    assert not out["overfitting"] and out["best_step"] == 30


def test_rising_validation_without_falling_training_is_not_overfitting():
    out = detect_overfitting(
        _rows([0.5] * 50, [0.6, 0.5, 0.7, 0.8, 0.9])
    )  # training flat: something else is wrong
    assert not out["overfitting"] and "did not keep falling" in out["message"]


def test_too_few_points():
    assert detect_overfitting(_rows([1.0, 0.9], [0.8, 0.7]))["status"] == "not enough points"
    assert detect_overfitting([])["status"] == "not enough points"


def test_early_stopping_patience():
    val = [(10, 1.0), (20, 0.8), (30, 0.9), (40, 0.85), (50, 0.7)]
    assert early_stopping_step(val, patience=2) == (20, 40)
    assert early_stopping_step(val, patience=3) == (50, None)
