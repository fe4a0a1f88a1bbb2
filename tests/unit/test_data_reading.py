"""Reading a user's data: label folders, text encodings (detected, declared, unknown), the default
label column, and splits that share no example (issue 11)."""

from __future__ import annotations

import pytest


def _recipe(path, task="classification", **data):
    from ftcli.recipe import recipe_from_mapping

    return recipe_from_mapping(
        {
            "name": "t",
            "task": task,
            "model": {"name": "m"},
            "data": {"path": str(path), **data},
            "method": {"kind": "full"},
        }
    )


def _label_folder(root, encoding="utf-8"):
    for label, words in (("pos", ["bon", "génial", "super"]), ("neg", ["mauvais", "nul", "raté"])):
        (root / label).mkdir(parents=True)
        for i in range(12):
            text = (
                f"film {i} {words[i % 3]} {'été' if i % 2 else 'hiver'}: "
                "le scénario était très réussi, les acteurs étaient à la hauteur."
            )
            (root / label / f"{i}.txt").write_bytes(text.encode(encoding))
    return root


def test_a_label_folder_just_works_without_naming_columns(tmp_path):
    from ftcli.data.examples import prepare

    prepared = prepare(_recipe(_label_folder(tmp_path / "reviews")))
    assert prepared.labels == ["neg", "pos"]
    texts = {e["text"] for s in prepared.splits.values() for e in s}
    assert any(t.startswith("film 1 génial été: le scénario") for t in texts)
    assert sum(map(len, prepared.splits.values())) == 24


def test_a_latin1_label_folder_is_decoded_not_replaced(tmp_path):
    from ftcli.data.examples import prepare

    root = _label_folder(tmp_path / "reviews", "latin-1")
    prepared = prepare(_recipe(root, encoding="latin-1"))
    texts = {e["text"] for s in prepared.splits.values() for e in s}
    assert any(t.startswith("film 1 génial été: le scénario") for t in texts)
    assert not any("\ufffd" in t for t in texts)
    # left at the default, it is detected and said so
    auto = prepare(_recipe(root))
    assert {e["text"] for s in auto.splits.values() for e in s} == texts
    assert auto.stats["notes"] and "decoded as" in auto.stats["notes"][0]


def test_without_a_label_column_the_message_says_the_default(tmp_path):
    from ftcli.data.examples import check_columns, load_examples  # noqa: F401
    from ftcli.errors import RecipeError

    p = tmp_path / "d.csv"
    p.write_text("review,stars\nnice,5\nbad,1\n")
    with pytest.raises(
        RecipeError,
        match=r"data.label_column: classification needs a label "
        r"column: the data has no column 'label' \(the default\); its columns "
        r"are: review, stars",
    ):
        check_columns(_recipe(p, text_column="review"), [{"review": "x", "stars": "1"}], str(p))


LATIN1 = "text,label\n" + "".join(
    f"caf\xe9 num\xe9ro {i} tr\xe8s {'bon' if i % 2 else 'mauvais'},{'pos' if i % 2 else 'neg'}\n"
    for i in range(40)
)


def test_a_latin1_csv_is_read_and_the_choice_reported(tmp_path):
    from ftcli.data.examples import prepare

    p = tmp_path / "d.csv"
    p.write_bytes(LATIN1.encode("latin-1"))
    prepared = prepare(_recipe(p, label_column="label"))
    texts = {e["text"] for s in prepared.splits.values() for e in s}
    assert "café numéro 1 très bon" in texts
    (note,) = prepared.stats["notes"]
    assert str(p) in note and "offset 14" in note and "data.encoding" in note
    explicit = prepare(_recipe(p, label_column="label", encoding="latin-1"))
    assert explicit.splits == prepared.splits and "notes" not in explicit.stats


def test_a_declared_encoding_that_fails_names_file_offset_and_key(tmp_path):
    from ftcli.data.examples import prepare
    from ftcli.errors import DataError

    p = tmp_path / "d.csv"
    p.write_bytes(LATIN1.encode("latin-1"))
    with pytest.raises(DataError) as exc:
        prepare(_recipe(p, label_column="label", encoding="utf-8"))
    msg = exc.value.render()
    assert f"{p}: not utf-8 text: byte 0xe9 at offset 14" in msg and "data.encoding" in msg


def test_an_unknown_encoding_is_a_recipe_error(tmp_path):
    from ftcli.errors import RecipeError

    with pytest.raises(RecipeError, match="data.encoding: unknown text encoding 'klingon'"):
        _recipe(tmp_path / "d.csv", label_column="label", encoding="klingon")


def test_no_test_example_is_shared_whatever_dedupe_says(tmp_path):
    import csv

    from ftcli.data.examples import _key, prepare

    rows = [{"text": f"line {i % 20}", "label": "ab"[i % 2]} for i in range(120)]  # 6 copies each
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    prepared = prepare(
        _recipe(p, label_column="label", clean={"dedupe": False}, split={"validation": 0.1})
    )
    keys = {s: {_key(e) for e in v} for s, v in prepared.splits.items()}
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["validation"]
    assert not keys["validation"] & keys["train"]
    sizes = {s: len(v) for s, v in prepared.splits.items()}
    shared = prepared.stats["dropped"]["shared_between_splits"]
    assert shared > 0 and sum(sizes.values()) + shared == 120  # the count is the truth
    assert prepared.stats["sizes"] == sizes


def test_too_few_examples_names_the_split_and_its_key(tmp_path):
    from ftcli.data.examples import prepare
    from ftcli.errors import DataError

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError) as exc:
        prepare(_recipe(p, task="causal_lm", split={"validation": 0.1, "test": 0.5}))
    msg = exc.value.render()
    assert "0.111111" not in msg and "only 1 example left to split" in msg
    assert "data.split.validation: 0.1" in msg
