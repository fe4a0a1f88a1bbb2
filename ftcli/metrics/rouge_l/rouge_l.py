"""ROUGE-L F-measure (longest common subsequence) of generated answers against references.

Scored by Google's ``rouge_score`` package (the reference re-implementation of ROUGE-1.5.5), with a
Unicode-aware tokenizer (lower-cased ``\\w+`` runs) instead of its ASCII-only default, so answers in
any script score. No stemming.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer


class _WordTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower(), flags=re.UNICODE)


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries",
            inputs_description="predictions: list of generated answers; references: list of reference answers",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_WordTokenizer())
        scores = [
            scorer.score(r, p)["rougeL"].fmeasure
            for p, r in zip(predictions, references, strict=True)
        ]
        return {
            "rouge_l": sum(scores) / len(scores) if scores else float("nan"),
            "per_example_rouge_l": scores,
        }
