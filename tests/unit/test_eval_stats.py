"""The paired statistics against scipy called directly, and against hand-computed values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from ftcli.evaluation import stats
from ftcli.evaluation.metrics import Headline, classification_headlines, macro_f1_vec


def _mean_headline(base, tuned, test="permutation", better=1) -> Headline:
    table = np.concatenate([np.asarray(base, float), np.asarray(tuned, float)])
    return Headline(
        "score",
        lambda rows, pos: table[rows].mean(axis=-1),
        better,
        test,
        table if test == "mcnemar" else None,
        len(base),
    )


def test_mcnemar_exact_by_hand_and_against_binomtest():
    base = (
        [1] * 1 + [0] * 9 + [1] * 5 + [0] * 5
    )  # 1 lost (1 -> 0), 9 gained (0 -> 1), 10 concordant
    tuned = [0] * 1 + [1] * 9 + [1] * 5 + [0] * 5
    out = stats.mcnemar(np.concatenate([base, tuned]).astype(float), 20)
    assert (out["baseline_only"], out["tuned_only"]) == (1, 9)
    assert out["p_value"] == pytest.approx(
        2 * (1 + 10) / 2**10
    )  # exact two-sided binomial, hand-computed
    assert out["p_value"] == pytest.approx(sps.binomtest(9, 10, 0.5).pvalue)
    assert stats.mcnemar(np.array([1.0, 0.0, 1.0, 0.0]), 2)["p_value"] == 1.0  # no discordant pair


def test_permutation_test_matches_scipy_and_exact_enumeration():
    rng = np.random.default_rng(3)
    base, tuned = rng.random(9), rng.random(9) + 0.3
    h = _mean_headline(base, tuned)
    ours = stats.paired_permutation(h, n_resamples=9999, seed=0)["p_value"]
    direct = sps.permutation_test(
        (base, tuned),
        lambda x, y, axis: np.mean(y - x, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=9999,
        rng=np.random.default_rng(0),
    ).pvalue
    assert ours == pytest.approx(direct)
    # n = 9 -> 512 sign patterns: scipy enumerates them all; count them by hand
    d = tuned - base
    obs = d.mean()
    flips = [np.mean(np.array(s) * d) for s in itertools.product([1, -1], repeat=9)]
    hand = min(
        1.0,
        2
        * min(
            np.mean([f >= obs - 1e-12 for f in flips]), np.mean([f <= obs + 1e-12 for f in flips])
        ),
    )
    assert ours == pytest.approx(hand)


def test_paired_bootstrap_matches_scipy_on_fixed_data():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    base = rng.dirichlet([1, 1, 1], 60)
    tuned = np.where(rng.random((60, 1)) < 0.7, np.eye(3)[y] * 0.8 + 0.2 / 3, base)
    heads = {h.name: h for h in classification_headlines(y, base, tuned, 3)}
    # accuracy: the mean of per-example (tuned correct - baseline correct)
    d = (tuned.argmax(1) == y).astype(float) - (base.argmax(1) == y).astype(float)
    ref = sps.bootstrap(
        (d,),
        np.mean,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(0),
        batch=500,
    ).confidence_interval
    assert stats.paired_bootstrap(heads["accuracy"], 2000, seed=0) == pytest.approx(
        (ref.low, ref.high)
    )
    # macro-F1: scipy resampling (y, base pred, tuned pred) jointly with sklearn as the statistic
    from sklearn.metrics import f1_score

    def diff(t, a, b):
        f = lambda p: f1_score(t, p, average="macro", labels=[0, 1, 2], zero_division=0)  # noqa: E731
        return f(b) - f(a)

    ref2 = sps.bootstrap(
        (y, base.argmax(1), tuned.argmax(1)),
        diff,
        paired=True,
        vectorized=False,
        n_resamples=300,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    i = np.arange(60)
    low, high = stats.paired_bootstrap(heads["macro_f1"], 300, seed=0)
    assert (low, high) == pytest.approx((ref2.low, ref2.high), abs=1e-12)
    assert heads["macro_f1"].fn(i + 60, i) - heads["macro_f1"].fn(i, i) == pytest.approx(
        diff(y, base.argmax(1), tuned.argmax(1))
    )
    assert macro_f1_vec(tuned.argmax(1), y, 3) == pytest.approx(
        f1_score(y, tuned.argmax(1), average="macro")
    )


def test_identical_models_are_no_significant_change():
    scores = np.random.default_rng(0).random(30)
    row = stats.compare(_mean_headline(scores, scores), n_resamples=999)
    assert row["diff"] == 0 and (row["ci_low"], row["ci_high"]) == (0.0, 0.0)
    assert row["p_value"] == 1.0 and row["verdict"] == stats.NO_CHANGE
    correct = (scores > 0.5).astype(float)
    row = stats.compare(_mean_headline(correct, correct, "mcnemar"), n_resamples=999)
    assert row["p_value"] == 1.0 and row["verdict"] == stats.NO_CHANGE


def test_verdicts_follow_the_metric_direction():
    rng = np.random.default_rng(1)
    base = rng.random(40)
    assert stats.compare(_mean_headline(base, base + 0.5), 999)["verdict"] == stats.IMPROVED
    assert stats.compare(_mean_headline(base, base - 0.5), 999)["verdict"] == stats.REGRESSED
    assert (
        stats.compare(_mean_headline(base, base + 0.5, better=-1), 999)["verdict"]
        == stats.REGRESSED
    )  # a loss rose
    noisy = base + rng.normal(0, 0.3, 40) * 0.01
    assert stats.compare(_mean_headline(base, noisy), 999)["verdict"] == stats.NO_CHANGE
    assert (
        stats.verdict(0.1, 0.05, 0.2, 0.2, +1) == stats.NO_CHANGE
    )  # interval excludes 0, test does not
    assert (
        stats.verdict(0.1, -0.01, 0.2, 0.01, +1) == stats.NO_CHANGE
    )  # test rejects, interval includes 0
    assert stats.verdict(0.1, 0.05, 0.2, 0.01, 0) == stats.NEUTRAL
