"""Perturbations change the input text only, deterministically."""

from __future__ import annotations

import random

from ftcli.evaluation.robustness import (
    PERTURBATIONS,
    char_noise,
    input_text,
    perturb_example,
    set_input,
)


def test_perturbations_touch_only_the_input():
    cls = {"text": "A Good Film", "label": "pos"}
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What Is 2 plus 2"},
            {"role": "assistant", "content": "Four"},
        ]
    }
    comp = {"prompt": "Q: Capital of France?", "completion": "Paris"}
    for name, fn in PERTURBATIONS.items():
        for ex in (cls, chat, comp):
            out = perturb_example(ex, fn, random.Random(0))
            if "label" in ex:
                assert out["label"] == "pos"
            if "messages" in ex:
                assert (
                    out["messages"][0] == ex["messages"][0]
                    and out["messages"][2] == ex["messages"][2]
                )
            if "completion" in ex:
                assert out["completion"] == "Paris"
            if name != "char_noise":
                assert input_text(out) != input_text(ex), name
    assert (
        input_text(perturb_example(cls, PERTURBATIONS["truncated"], random.Random(0))) == "A Good"
    )
    assert (
        input_text(perturb_example(comp, PERTURBATIONS["lowercase"], random.Random(0)))
        == "q: capital of france?"
    )
    assert cls == {"text": "A Good Film", "label": "pos"}  # the original is never modified


def test_char_noise_is_seeded_and_bounded():
    text = "the quick brown fox jumps over the lazy dog " * 20
    a, b = char_noise(text, random.Random(7)), char_noise(text, random.Random(7))
    assert a == b and a != text
    assert abs(len(a) - len(text)) < 0.05 * len(text)


def test_set_input():
    assert set_input({"text": "x", "label": "a"}, "")["text"] == ""
    assert input_text(set_input({"prompt": "p", "completion": "c"}, "long")) == "long"
