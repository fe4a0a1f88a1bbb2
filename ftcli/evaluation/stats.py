"""Paired significance: the same test examples scored by two models.

- a paired bootstrap 95% interval of (fine-tuned - baseline), ``scipy.stats.bootstrap`` resampling
  example indices (percentile method: it stays defined when every difference is zero);
- McNemar's exact test (``scipy.stats.binomtest`` on the discordant pairs) for metrics that are
  the mean of a per-example 0/1 outcome (accuracy, exact match, EOS share);
- a paired permutation test (``scipy.stats.permutation_test``, ``permutation_type="samples"``:
  swap the two models' outputs example by example) for everything else (macro-F1, calibration,
  loss, token F1, ROUGE-L), exact when there are few examples.

The verdict needs both: the test's p below alpha and an interval that excludes zero.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ftcli.evaluation.metrics import Headline

ALPHA = 0.05
IMPROVED, REGRESSED, NO_CHANGE, NEUTRAL = "improved", "regressed", "no significant change", "n/a"


def _rng(seed: int):
    return np.random.default_rng(seed)


def paired_bootstrap(
    h: Headline, n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of fn(tuned) - fn(baseline) over resampled test examples."""
    from scipy.stats import bootstrap

    n = h.n
    idx = np.arange(n)

    def diff(i, axis=-1):
        return h.fn(i + n, i) - h.fn(i, i)

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # a degenerate (all-equal) distribution is a valid answer here
        res = bootstrap(
            (idx,),
            diff,
            vectorized=True,
            paired=False,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=_rng(seed),
            batch=500,
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar(binary: np.ndarray, n: int) -> dict:
    """Exact McNemar test on per-example 0/1 outcomes ``binary`` = [baseline (n); fine-tuned (n)]."""
    from scipy.stats import binomtest

    a, b = np.asarray(binary[:n]) > 0.5, np.asarray(binary[n:]) > 0.5
    lost = int((a & ~b).sum())  # baseline right, fine-tuned wrong
    gained = int((~a & b).sum())  # baseline wrong, fine-tuned right
    p = binomtest(gained, lost + gained, 0.5).pvalue if lost + gained else 1.0
    return {
        "test": "McNemar exact",
        "p_value": float(p),
        "baseline_only": lost,
        "tuned_only": gained,
    }


def paired_permutation(h: Headline, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Two-sided paired permutation (approximate randomization) test of fn(tuned) - fn(baseline)."""
    from scipy.stats import permutation_test

    n = h.n
    idx = np.arange(n)

    def diff(x, y, axis=-1):
        pos = np.broadcast_to(idx, np.shape(x))
        return h.fn(y, pos) - h.fn(x, pos)

    res = permutation_test(
        (idx, idx + n),
        diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        rng=_rng(seed),
        batch=500,
    )
    return {"test": "paired permutation", "p_value": float(res.pvalue)}


def verdict(
    diff: float, low: float, high: float, p: float, better: int, alpha: float = ALPHA
) -> str:
    """improved / regressed / no significant change, in the metric's own direction."""
    if better == 0 or any(map(math.isnan, (diff, low, high, p))):
        return NEUTRAL
    if p < alpha and (low > 0 or high < 0):
        return IMPROVED if (low > 0) == (better > 0) else REGRESSED
    return NO_CHANGE


def compare(h: Headline, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Both values, the difference, its interval, the paired test and the verdict for one metric."""
    n = h.n
    idx = np.arange(n)
    base, tuned = float(h.fn(idx, idx)), float(h.fn(idx + n, idx))
    row = {
        "metric": h.name,
        "n": n,
        "baseline": base,
        "tuned": tuned,
        "diff": tuned - base,
        "better": h.better,
    }
    if n < 2:
        row.update(
            ci_low=float("nan"),
            ci_high=float("nan"),
            p_value=float("nan"),
            test="too few examples",
            verdict=NEUTRAL,
        )
        return row
    low, high = paired_bootstrap(h, n_resamples, seed=seed)
    test = mcnemar(h.binary, n) if h.test == "mcnemar" else paired_permutation(h, n_resamples, seed)
    row.update(ci_low=low, ci_high=high, **test)
    row["verdict"] = verdict(row["diff"], low, high, row["p_value"], h.better)
    return row


# --------------------------------------------------------------------------- how figures read


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -(digits - 1) or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def verdict_text(row: dict, baseline_name: str) -> str:
    name = row["metric"].replace("_", " ")
    if row["verdict"] == NEUTRAL:
        return f"{name}: {fmt(row['baseline'])} -> {fmt(row['tuned'])} ({row.get('test')})"
    return (
        f"{row['verdict']}: {name} {fmt(row['baseline'])} ({baseline_name}) -> {fmt(row['tuned'])} (fine-tuned), "
        f"difference {row['diff']:+.4f}, 95% CI [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], "
        f"{row['test']} p = {fmt_p(row['p_value'])}, n = {row['n']}"
    )
