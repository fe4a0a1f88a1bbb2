"""Exact match and token F1 of generated answers against references, per example and on average.

Both compare SQuAD-normalized text: lower case, punctuation and the articles a/an/the removed,
whitespace collapsed. Token F1 is the harmonic mean of token precision and recall over the bag of
normalized tokens (two empty answers match with F1 1; one empty answer scores 0).
"""

import collections
import re
import string

import datasets
import evaluate

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class TextMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al. 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text",
            inputs_description="predictions: list of generated answers; references: list of reference answers",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        em = [
            float(normalize(p) == normalize(r))
            for p, r in zip(predictions, references, strict=True)
        ]
        f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
        n = len(em)
        return {
            "exact_match": sum(em) / n if n else float("nan"),
            "token_f1": sum(f1) / n if n else float("nan"),
            "per_example_exact_match": em,
            "per_example_token_f1": f1,
        }
