"""ftcli eval's metrics against values computed by hand (and sklearn where it has them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftcli.evaluation.metrics import (
    answer_scores,
    classification_headlines,
    classification_report,
    expected_calibration_error,
    generation_headlines,
    lm_loss_headlines,
    lm_summary,
    load_metric,
    macro_f1_vec,
)


def test_exact_match_and_token_f1_by_hand():
    s = answer_scores(
        ["The cat sat.", "a b c", "", "dog", "x y"], ["cat sat", "b c d", "", "cat", "y x y"]
    )
    # SQuAD normalization: case, punctuation and articles go; "a" is an article
    assert s["exact_match"] == [1.0, 0.0, 1.0, 0.0, 0.0]
    # "b c" vs "b c d": P = 1, R = 2/3 -> F1 = 0.8; "x y" vs "y x y": common 2, P = 1, R = 2/3 -> 0.8
    assert s["token_f1"] == pytest.approx([1.0, 0.8, 1.0, 0.0, 0.8])


def test_rouge_l_by_hand():
    s = answer_scores(
        ["the cat sat on the mat", "a b c d", "héllo wörld"],
        ["the cat is on the mat", "d c b a", "héllo wörld"],
    )
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each way -> F = 5/6
    # "a b c d" vs "d c b a": LCS 1 of 4 -> 0.25; non-ASCII words count (Unicode tokenizer)
    assert s["rouge_l"] == pytest.approx([5 / 6, 0.25, 1.0])


def test_metric_modules_load_from_the_package_by_path():
    m = load_metric("text_match")
    out = m.compute(predictions=["Paris"], references=["paris!"])
    assert out["exact_match"] == 1.0
    with pytest.raises(FileNotFoundError):
        load_metric("no_such_metric")


def test_classification_report_by_hand():
    y = [0, 0, 1, 1, 2]
    probs = [
        [0.7, 0.2, 0.1],
        [0.3, 0.62, 0.08],
        [0.1, 0.85, 0.05],
        [0.2, 0.55, 0.25],
        [0.45, 0.35, 0.2],
    ]
    m = classification_report(y, probs, ["a", "b", "c"])  # predictions 0, 1, 1, 1, 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == 1.0 and m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # ECE, 15 bins of width 1/15: confidences 0.7 (bin 10, right), 0.62 (bin 9, wrong), 0.85 (bin 12, right),
    # 0.55 (bin 8, right), 0.45 (bin 6, wrong) -> (0.3 + 0.62 + 0.15 + 0.45 + 0.45) / 5
    assert m["calibration_error"] == pytest.approx((0.3 + 0.62 + 0.15 + 0.45 + 0.45) / 5)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.85, 0.55, 0.2])))
    assert m["majority_rate"] == pytest.approx(2 / 5)


def test_ece_shares_a_bin_by_hand():
    # 0.9 and 0.92 share bin 13 (0.8667, 0.9333]: |(1 + 0) - (0.9 + 0.92)| = 0.82; 0.3 alone: |1 - 0.3|
    assert expected_calibration_error([0.9, 0.92, 0.3], [1, 0, 1]) == pytest.approx(
        (0.82 + 0.7) / 3
    )


def test_vectorized_forms_match_the_scalar_ones():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    for k in (2, 3, 5):
        t, p = rng.integers(0, k, (20, 30)), rng.integers(0, k, (20, 30))
        ref = [
            f1_score(t[i], p[i], average="macro", labels=list(range(k)), zero_division=0)
            for i in range(20)
        ]
        assert np.allclose(macro_f1_vec(p, t, k), ref)
    conf, corr = rng.random((6, 40)), rng.integers(0, 2, (6, 40))
    assert np.allclose(
        expected_calibration_error(conf, corr),
        [expected_calibration_error(conf[i], corr[i]) for i in range(6)],
    )


def test_headlines_compute_the_reported_values():
    y = [0, 1, 1, 0]
    base = [[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]]
    tuned = [[0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.4, 0.6]]
    idx = np.arange(4)
    heads = {h.name: h for h in classification_headlines(y, base, tuned, 2)}
    assert heads["accuracy"].fn(idx, idx) == pytest.approx(0.75) and heads["accuracy"].fn(
        idx + 4, idx
    ) == pytest.approx(0.75)
    assert heads["macro_f1"].fn(idx + 4, idx) == pytest.approx(
        classification_report(y, tuned, ["a", "b"])["macro_f1"]
    )
    loss = {h.name: h for h in lm_loss_headlines([4.0, 2.0], [2.0, 1.0], [2, 2])}
    assert loss["completion_loss"].fn(np.arange(2), np.arange(2)) == pytest.approx(1.5)
    assert loss["perplexity"].fn(np.arange(2) + 2, np.arange(2)) == pytest.approx(math.exp(0.75))
    assert lm_summary([4.0, 2.0], [2, 2])["perplexity"] == pytest.approx(math.exp(1.5))
    gen = {
        h.name: h
        for h in generation_headlines(
            {
                "exact_match": [0, 1],
                "token_f1": [0.5, 1],
                "rouge_l": [0.2, 1],
                "stop_rate": [0, 0],
                "answer_tokens": [8, 4],
            },
            {
                "exact_match": [1, 1],
                "token_f1": [1, 1],
                "rouge_l": [1, 1],
                "stop_rate": [1, 1],
                "answer_tokens": [2, 2],
            },
        )
    }
    i = np.arange(2)
    assert gen["stop_rate"].fn(i + 2, i) == 1.0 and gen["answer_tokens"].fn(i, i) == 6.0
    assert gen["exact_match"].test == "mcnemar" and gen["answer_tokens"].better == 0
