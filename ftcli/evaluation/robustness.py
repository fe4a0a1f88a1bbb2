"""Robustness: the fine-tuned model's metrics when the test inputs are perturbed, and stress inputs.

Perturbations (seeded, applied to the input text: a classification example's text, a causal-LM
example's prompt or last user message): lower case, upper case, character noise (5% of letters
swapped, dropped or replaced), truncation to the first half of the words, and an irrelevant
sentence appended. Stress: an empty input and one far longer than ``data.max_length`` must give
valid probabilities / a finite loss and a bounded answer.
"""

from __future__ import annotations

import math
import random
import string

import numpy as np

from ftcli.evaluation.metrics import classification_report, lm_summary
from ftcli.evaluation.score import answer_examples, score_model, tokenize_aligned

DISTRACTOR = "By the way, the weather report for tomorrow mentions light rain in the afternoon."
NOISE = 0.05


def char_noise(text: str, rng: random.Random, rate: float = NOISE) -> str:
    chars = list(text)
    out, i = [], 0
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            op = rng.randrange(3)
            if op == 0 and i + 1 < len(chars):  # swap with the next character
                out += [chars[i + 1], c]
                i += 2
                continue
            if op == 1:  # drop
                i += 1
                continue
            out.append(rng.choice(string.ascii_lowercase))  # replace
        else:
            out.append(c)
        i += 1
    return "".join(out)


def truncate_words(text: str) -> str:
    words = text.split()
    return " ".join(words[: max(1, math.ceil(len(words) / 2))]) if words else text


PERTURBATIONS = {
    "lowercase": lambda t, rng: t.lower(),
    "uppercase": lambda t, rng: t.upper(),
    "char_noise": char_noise,
    "truncated": lambda t, rng: truncate_words(t),
    "appended_text": lambda t, rng: f"{t} {DISTRACTOR}" if t else DISTRACTOR,
}


def perturb_example(example: dict, fn, rng: random.Random) -> dict:
    """A copy of a canonical example with its input text perturbed (never its answer or label)."""
    e = dict(example)
    if "messages" in e:
        msgs = [dict(m) for m in e["messages"]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        users = [i for i in range(last) if msgs[i]["role"] == "user"]
        if users:
            msgs[users[-1]]["content"] = fn(msgs[users[-1]]["content"], rng)
        e["messages"] = msgs
    elif "prompt" in e:
        e["prompt"] = fn(e["prompt"], rng)
    elif "label" in e:
        e["text"] = fn(e["text"], rng)
    return e


def set_input(example: dict, text: str) -> dict:
    """A copy of ``example`` whose input (text, prompt or last user message) is ``text``."""
    return perturb_example(example, lambda t, rng: text, random.Random(0))


def input_text(example: dict) -> str:
    if "messages" in example:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        users = [m["content"] for m in msgs[:last] if m["role"] == "user"]
        return users[-1] if users else ""
    return example.get("prompt", example.get("text", ""))


def applies(recipe) -> bool:
    return recipe.task == "classification" or recipe.data.style != "text"


def robustness(
    recipe, model, tokenizer, examples: list[dict], label2id, device, clean: dict, seed: int = 0
) -> dict:
    """Metrics of ``model`` on each perturbed copy of the test examples, beside the clean ones."""
    if not applies(recipe):
        return {"applies": False, "why": "plain-text causal-LM data has no input to perturb"}
    rows = []
    for name, fn in PERTURBATIONS.items():
        pert = [
            perturb_example(e, fn, random.Random(seed * 1_000_003 + i))
            for i, e in enumerate(examples)
        ]
        feats, kept = tokenize_aligned(pert, recipe, tokenizer, label2id)
        s = score_model(name, recipe, model, tokenizer, pert, feats, kept, device, generate=False)
        if recipe.task == "classification":
            labels = list(label2id)
            m = classification_report([f["labels"] for f in feats], s.probs, labels)
            pred = np.asarray(s.probs).argmax(1)
            flips = float((pred != np.asarray(clean["pred"])).mean())
            rows.append(
                {
                    "perturbation": name,
                    "accuracy": m["accuracy"],
                    "macro_f1": m["macro_f1"],
                    "accuracy_change": m["accuracy"] - clean["accuracy"],
                    "prediction_flips": flips,
                }
            )
        else:
            m = lm_summary(s.loss_sums, s.tokens)
            rows.append(
                {
                    "perturbation": name,
                    "completion_loss": m["completion_loss"],
                    "examples": len(feats),
                    "loss_change": m["completion_loss"] - clean["completion_loss"],
                }
            )
    return {
        "applies": True,
        "seed": seed,
        "noise_rate": NOISE,
        "distractor": DISTRACTOR,
        "rows": rows,
    }


def stress(recipe, model, tokenizer, examples: list[dict], label2id, device) -> list[dict]:
    """Empty and very long inputs: valid outputs, truncated to data.max_length, bounded answers."""
    if not examples:
        return []
    first = examples[0]
    long_text = " ".join([input_text(first) or "word"] * (4 * recipe.data.max_length))
    out = []
    for case, text in (("empty input", ""), ("very long input", long_text)):
        ex = set_input(first, text)
        row = {"case": case, "input_chars": len(text)}
        try:
            feats, kept = tokenize_aligned([ex], recipe, tokenizer, label2id)
            if not feats:
                row.update(
                    ok=True,
                    result="dropped before scoring: no answer token left within data.max_length",
                )
                out.append(row)
                continue
            row["input_tokens"] = len(feats[0]["input_ids"])
            s = score_model(
                case, recipe, model, tokenizer, [ex], feats, kept, device, generate=False
            )
            if recipe.task == "classification":
                p = s.probs[0]
                ok = all(math.isfinite(x) for x in p) and abs(sum(p) - 1) < 1e-4
                labels = list(label2id)
                row.update(
                    ok=ok,
                    result=f"predicted {labels[max(range(len(p)), key=p.__getitem__)]} "
                    f"(p={max(p):.3f}); probabilities {'valid' if ok else 'INVALID'}",
                )
            else:
                loss = s.loss_sums[0] / max(1, s.tokens[0])
                ans = (
                    answer_examples(model, tokenizer, recipe, [ex], device)
                    if recipe.data.style != "text"
                    else []
                )
                ok = math.isfinite(loss) and all(
                    a["tokens"] <= recipe.eval.max_new_tokens for a in ans
                )
                row.update(
                    ok=ok,
                    result=f"loss {loss:.3f} per token"
                    + (
                        f"; answered {ans[0]['tokens']} tokens, {'stopped' if ans[0]['stopped'] else 'hit the bound'}"
                        if ans
                        else ""
                    ),
                )
            row["within_max_length"] = row["input_tokens"] <= recipe.data.max_length
            row["ok"] = row["ok"] and row["within_max_length"]
        except (
            Exception
        ) as exc:  # a stress failure is a finding to report, not a reason to lose the report
            row.update(ok=False, result=f"failed: {type(exc).__name__}: {exc}")
        out.append(row)
    return out
