"""data.augment: every op does what it says on fixed text, copies are deterministic and marked,
and only the training split is touched."""

from __future__ import annotations

import random

import pytest

from ftcli.data.augment import (
    KEY_NEIGHBOURS,
    apply_op,
    augment_train,
    op_delete,
    op_insert,
    op_swap,
    op_synonym,
    op_typo,
    synonyms,
)
from ftcli.recipe import AugmentSpec

TEXT = str.split("The movie was a wonderful and moving story about a brave young soldier")


def test_synonym_replaces_words_with_wordnet_synonyms():
    out = op_synonym(TEXT, 0.2, random.Random(0))
    assert len(out) == len(TEXT)
    changed = [(a, b) for a, b in zip(TEXT, out, strict=True) if a != b]
    assert len(changed) == round(0.2 * len(TEXT))
    for old, new in changed:
        assert new.lower() in synonyms(old)
        assert old.lower() not in {"the", "was", "a", "and", "about"}  # stopwords stay
    assert "film" in synonyms("movie") and "movie" not in synonyms("movie")


def test_insert_adds_synonyms_and_keeps_every_word():
    out = op_insert(TEXT, 0.2, random.Random(1))
    n = round(0.2 * len(TEXT))
    assert len(out) == len(TEXT) + n
    rest = list(out)
    for w in TEXT:  # the original words, in order, with the insertions between them
        rest = rest[rest.index(w) + 1 :]
    inserted = list(out)
    for w in TEXT:
        inserted.remove(w)
    pool = {s for w in TEXT for s in synonyms(w)}
    assert inserted and all(w in pool for w in inserted)


def test_swap_permutes_words():
    out = op_swap(TEXT, 0.2, random.Random(2))
    assert sorted(out) == sorted(TEXT) and out != TEXT


def test_delete_drops_words_in_order_and_keeps_one():
    out = op_delete(TEXT, 0.3, random.Random(3))
    assert 0 < len(out) < len(TEXT)
    it = iter(TEXT)
    assert all(w in it for w in out)  # a subsequence of the original
    assert len(op_delete(["alone"], 0.9, random.Random(0))) == 1
    assert len(op_delete(["a", "b"], 1.0, random.Random(0))) == 1


def test_typo_changes_one_letter_to_a_neighbouring_key():
    out = op_typo(TEXT, 0.2, random.Random(4))
    changed = [(a, b) for a, b in zip(TEXT, out, strict=True) if a != b]
    assert len(changed) == round(0.2 * len(TEXT))
    for old, new in changed:
        diff = [(x, y) for x, y in zip(old, new, strict=True) if x != y]
        assert len(diff) == 1
        x, y = diff[0]
        assert y.lower() in KEY_NEIGHBOURS[x.lower()]
    assert set(KEY_NEIGHBOURS["a"]) == set("qwsz") and "g" in KEY_NEIGHBOURS["f"]


def test_punctuation_and_case_survive_a_synonym():
    text = "Movie, great!"
    outs = {apply_op("synonym", text, 1.0, random.Random(s)) for s in range(20)}
    assert any(o != text for o in outs)
    for o in outs:  # "Film, great!", "Motion picture, outstanding!" ...
        assert o[0].isupper() and o.endswith("!") and "," in o


def examples(n=20):
    words = str.split("good bad film movie story actor plot scene brave dull")
    rng = random.Random(0)
    return [
        {"text": " ".join(rng.choice(words) for _ in range(8)), "label": ["fresh", "rotten"][i % 2]}
        for i in range(n)
    ]


def test_copies_are_deterministic_marked_and_counted():
    spec = AugmentSpec(copies=2, p=0.2, seed=7)
    train = examples()
    a, stats_a = augment_train(train, spec, "classification")
    b, stats_b = augment_train(train, spec, "classification")
    assert a == b and stats_a == stats_b
    assert a[: len(train)] == train  # originals first, untouched
    copies = a[len(train) :]
    assert len(copies) == stats_a["added"] == 2 * len(train) - stats_a["dropped_identical"]
    for c in copies:
        src = train[c["augmented"]["of"]]
        assert c["label"] == src["label"] and c["text"] != src["text"]
        assert c["augmented"]["op"] in spec.ops
    assert sum(stats_a["by_op"].values()) == stats_a["added"]
    other, _ = augment_train(train, AugmentSpec(copies=2, p=0.2, seed=8), "classification")
    assert other != a


def test_causal_lm_rewrites_prompts_only_unless_asked():
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Be kind to every visitor today"},
                {"role": "user", "content": "tell me about the brave young soldier story"},
                {"role": "assistant", "content": "the brave young soldier story is moving"},
            ]
        }
    ]
    spec = AugmentSpec(copies=3, ops=["swap"], p=0.3)
    out, _ = augment_train(chat, spec, "causal_lm")
    assert len(out) == 4
    for c in out[1:]:
        assert c["messages"][0] == chat[0]["messages"][0]
        assert c["messages"][2] == chat[0]["messages"][2]  # the answer is never rewritten silently
        assert c["messages"][1] != chat[0]["messages"][1]
    both, _ = augment_train(
        chat, AugmentSpec(copies=3, ops=["swap"], p=0.3, completions=True), "causal_lm"
    )
    assert any(c["messages"][2] != chat[0]["messages"][2] for c in both[1:])
    pc = [{"prompt": "what makes a brave soldier story", "completion": "courage and loss"}]
    out, _ = augment_train(pc, AugmentSpec(copies=2, ops=["swap"]), "causal_lm")
    assert all(c["completion"] == "courage and loss" for c in out)


def test_prepare_augments_train_only(tmp_path):
    import csv

    from ftcli.data.examples import prepare
    from ftcli.recipe import recipe_from_mapping
    from tests.conftest import sentiment_rows

    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(sentiment_rows(100))
    base = {
        "name": "aug",
        "task": "classification",
        "model": {"name": "unused"},
        "data": {
            "path": str(data),
            "label_column": "label",
            "split": {"validation": 0.1, "test": 0.2},
        },
        "method": {"kind": "lora"},
    }
    plain = prepare(recipe_from_mapping(base))
    aug = {
        **base,
        "data": {**base["data"], "augment": {"copies": 2, "ops": ["swap", "typo"], "seed": 1}},
    }
    augmented = prepare(recipe_from_mapping(aug))
    assert augmented.splits["validation"] == plain.splits["validation"]
    assert augmented.splits["test"] == plain.splits["test"]
    n = len(plain.splits["train"])
    assert augmented.splits["train"][:n] == plain.splits["train"]
    assert all("augmented" in e for e in augmented.splits["train"][n:])
    stats = augmented.stats["augmented"]
    assert stats["added"] == len(augmented.splits["train"]) - n > n
    assert augmented.stats["sizes"]["train"] == len(augmented.splits["train"])


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"ops": []}, "augmentation would add nothing"),
        ({"ops": ["shuffle"]}, "is not one of"),
        ({"p": 0}, "greater than 0"),
    ],
)
def test_bad_augment_keys_are_recipe_errors(augment, message):
    from ftcli.errors import RecipeError
    from ftcli.recipe import recipe_from_mapping

    m = {
        "name": "aug",
        "task": "classification",
        "model": {"name": "unused"},
        "data": {"path": "x.csv", "label_column": "label", "augment": augment},
        "method": {"kind": "lora"},
    }
    with pytest.raises(RecipeError, match=message):
        recipe_from_mapping(m)
