"""prepare(): every source and format, cleaning, splitting without leakage, and tokenization masks."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import time

import pytest

from ftcli.data.examples import load_prepared, prepare, save_prepared
from ftcli.data.read import read_file
from ftcli.data.tokenize import IGNORE_INDEX, tokenize
from ftcli.errors import DataError, FtcliError, RecipeError, SourceError
from ftcli.recipe import recipe_from_mapping

ROWS = [
    {
        "text": f"review number {i} is {'good' if i % 2 else 'bad'}",
        "label": "pos" if i % 2 else "neg",
    }
    for i in range(60)
]


def cls_recipe(path, **data) -> object:
    return recipe_from_mapping(
        {
            "name": "t",
            "task": "classification",
            "model": {"name": "m"},
            "data": {"path": str(path), "text_column": "text", "label_column": "label", **data},
            "method": {"kind": "full"},
        }
    )


def lm_recipe(path, **data) -> object:
    return recipe_from_mapping(
        {
            "name": "t",
            "task": "causal_lm",
            "model": {"name": "m"},
            "data": {"path": str(path), **data},
            "method": {"kind": "full"},
        }
    )


def write_csv(path, rows, sep=","):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet", "csv.gz", "jsonl.bz2"])
def test_every_file_format_reads_the_same_records(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    base = fmt.split(".")[0]
    if base == "csv":
        write_csv(tmp_path / "d.csv", ROWS)
    elif base == "tsv":
        write_csv(path, ROWS, sep="\t")
    elif base == "json":
        path.write_text(json.dumps(ROWS))
    elif base == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif base == "parquet":
        import pandas as pd

        pd.DataFrame(ROWS).to_parquet(path)
    if fmt == "csv.gz":
        path.write_bytes(gzip.compress((tmp_path / "d.csv").read_bytes()))
    if fmt == "jsonl.bz2":
        path.write_bytes(bz2.compress((tmp_path / "d.jsonl").read_bytes()))
    assert read_file(str(path)) == ROWS


def test_txt_file_is_one_example_per_line(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("first line\n\nsecond line\n")
    assert read_file(str(p)) == [{"text": "first line"}, {"text": "second line"}]


def test_empty_csv_cell_stays_text_not_float(tmp_path):
    p = write_csv(tmp_path / "d.csv", [{"text": "", "label": "a"}, {"text": "x", "label": "b"}])
    assert read_file(str(p))[0]["text"] == ""  # docs/traps.md#empty-text-cells-read-as-numbers


def test_label_folder(tmp_path):
    for label in ("neg", "pos"):
        (tmp_path / "reviews" / label).mkdir(parents=True)
        for i in range(15):
            (tmp_path / "reviews" / label / f"{i}.txt").write_text(f"{label} review {i}\n")
    prepared = prepare(cls_recipe(tmp_path / "reviews"))
    assert prepared.labels == ["neg", "pos"]
    assert sum(len(v) for v in prepared.splits.values()) == 30


def test_glob_sources(tmp_path):
    write_csv(tmp_path / "a.csv", ROWS[:30])
    write_csv(tmp_path / "b.csv", ROWS[30:])
    prepared = prepare(cls_recipe(tmp_path / "*.csv"))
    assert sum(len(v) for v in prepared.splits.values()) == 60


def test_pkg_source_reads_installed_package_data():
    """pkg:PACKAGE/PATH reads data shipped inside an installed package (here: chatterbot-corpus)."""
    r = lm_recipe("pkg:chatterbot_corpus/data/english/*.yml", messages_column="messages")
    prepared = prepare(r)
    ex = prepared.splits["train"][0]["messages"]
    assert ex[0]["role"] == "user" and ex[1]["role"] == "assistant"
    assert (
        prepared.stats["read"] == 2026
    )  # 21 topic files; over half are exact repeats (tech_support)
    assert sum(len(v) for v in prepared.splits.values()) == 2026 - sum(
        prepared.stats["dropped"].values()
    )


def test_missing_package_says_what_to_install():
    with pytest.raises(SourceError, match="pip install --no-deps not-a-real-pkg"):
        prepare(cls_recipe("pkg:not_a_real_pkg/x.csv"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="data.path: data not found"):  # located at its key
        prepare(cls_recipe(tmp_path / "nope.csv"))


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="offline mode"):
        prepare(cls_recipe("someone/some-dataset"))
    # not the ~23-47 s of a network timeout (docs/traps.md#a-missing-network-is-slow-to-fail)
    assert time.perf_counter() - t0 < 10


def test_unknown_label_column_is_located_with_a_suggestion(tmp_path):
    import yaml

    from ftcli.recipe import load_recipe

    p = write_csv(tmp_path / "d.csv", [{"text": r["text"], "category": r["label"]} for r in ROWS])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "task": "classification",
                "model": {"name": "m"},
                "data": {"path": str(p), "label_column": "categry"},
                "method": {"kind": "full"},
            },
            sort_keys=False,
        )
    )
    with pytest.raises(RecipeError) as info:
        prepare(load_recipe(recipe_file))
    assert [x.render() for x in info.value.problems] == [
        f"{recipe_file}:7: data.label_column: column 'categry' is not in the data; its columns are: text, category "
        "(did you mean 'category'?)"
    ]


def test_empty_dataset(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        prepare(cls_recipe(p))


def test_cleaning_strips_drops_empty_and_duplicates(tmp_path):
    rows = ROWS + [
        {"text": "  ", "label": "pos"},
        {"text": ROWS[0]["text"] + "  ", "label": ROWS[0]["label"]},
    ]
    prepared = prepare(cls_recipe(write_csv(tmp_path / "d.csv", rows)))
    assert prepared.stats["dropped"]["empty"] == 1
    assert prepared.stats["dropped"]["duplicate"] == 1
    assert sum(prepared.stats["sizes"].values()) == 60


def test_labels_filter_keeps_only_named_labels_in_order(tmp_path):
    rows = ROWS + [{"text": f"plot {i}", "label": "plot"} for i in range(10)]
    prepared = prepare(cls_recipe(write_csv(tmp_path / "d.csv", rows), labels=["pos", "neg"]))
    assert prepared.labels == ["pos", "neg"]
    assert prepared.stats["dropped"]["unlisted_label"] == 10
    with pytest.raises(RecipeError, match="label\\(s\\) 'fresh' never occur"):
        prepare(cls_recipe(write_csv(tmp_path / "d.csv", rows), labels=["pos", "fresh"]))


def test_split_fractions_seed_stratify_and_no_leakage(tmp_path):
    p = write_csv(tmp_path / "d.csv", ROWS)
    a = save_prepared(
        prepare(cls_recipe(p, split={"validation": 0.1, "test": 0.2, "seed": 3})),
        tmp_path / "run" / "data",
    )
    b = prepare(cls_recipe(p, split={"validation": 0.1, "test": 0.2, "seed": 3}))
    c = prepare(cls_recipe(p, split={"validation": 0.1, "test": 0.2, "seed": 4}))
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 42, "validation": 6, "test": 12}
    assert a.splits == b.splits and a.splits["test"] != c.splits["test"]
    keys = {k: {json.dumps(e, sort_keys=True) for e in v} for k, v in a.splits.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert sorted(e["label"] for e in a.splits["test"]).count("pos") == 6  # stratified
    again = load_prepared(tmp_path / "run" / "data")  # the sealed split reads back identically
    assert again.splits == a.splits and again.labels == a.labels


def test_explicit_split_files_win_and_overlap_is_removed(tmp_path):
    p = write_csv(tmp_path / "train.csv", ROWS)
    t = write_csv(tmp_path / "test.csv", ROWS[:10])
    prepared = prepare(cls_recipe(p, test_path=str(t)))
    assert prepared.splits["test"] == [{"text": r["text"], "label": r["label"]} for r in ROWS[:10]]
    assert prepared.stats["dropped"]["shared_between_splits"] == 10
    test_keys = {e["text"] for e in prepared.splits["test"]}
    assert not any(e["text"] in test_keys for e in prepared.splits["train"])


def test_caps_apply_after_the_split_so_the_test_split_is_unchanged(tmp_path):
    p = write_csv(tmp_path / "d.csv", ROWS)
    full = prepare(cls_recipe(p))
    capped = prepare(cls_recipe(p, max_train_examples=10))
    assert len(capped.splits["train"]) == 10 and capped.splits["test"] == full.splits["test"]


def test_instruction_and_completion_layouts(tmp_path):
    rows = [{"instruction": f"add {i} and 1", "input": "", "output": str(i + 1)} for i in range(20)]
    p = tmp_path / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = lm_recipe(
        p,
        instruction_column="instruction",
        input_column="input",
        output_column="output",
        system_prompt="Be brief.",
    )
    ex = prepare(r).splits["train"][0]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    r2 = lm_recipe(p, prompt_column="instruction", completion_column="output")
    ex2 = prepare(r2).splits["train"][0]
    assert set(ex2) == {"prompt", "completion"}


def test_bad_messages_are_a_clear_error(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(DataError, match="must be a list of \\{role, content\\} messages"):
        prepare(lm_recipe(p, messages_column="messages"))


def test_unreadable_format(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("x")
    with pytest.raises(FtcliError, match="cannot tell the data format"):
        prepare(cls_recipe(p))


# --------------------------------------------------------------------------- tokenization


def test_chat_labels_cover_only_assistant_turns_and_end_with_eos(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    r = lm_recipe("x.jsonl", messages_column="messages", max_length=128)
    ex = {
        "messages": [
            {"role": "user", "content": "what is 2 plus 3 ?"},
            {"role": "assistant", "content": "2 plus 3 is 5 ."},
            {"role": "user", "content": "and 1 plus 1 ?"},
            {"role": "assistant", "content": "1 plus 1 is 2 ."},
        ]
    }
    f = tokenize([ex], r, tok, None).features[0]
    supervised = tok.decode(
        [t for t, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert supervised == "2 plus 3 is 5 .<|im_end|>\n1 plus 1 is 2 .<|im_end|>\n"
    assert "what is" not in supervised


def test_completion_loss_masks_the_prompt_and_appends_eos(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    r = lm_recipe("x.jsonl", prompt_column="p", completion_column="c", max_length=128)
    f = tokenize([{"prompt": "what is 1 plus 1 ?", "completion": " 2"}], r, tok, None).features[0]
    assert f["input_ids"][-1] == tok.eos_token_id and f["labels"][-1] == tok.eos_token_id
    assert (
        tok.decode(
            [t for t, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != IGNORE_INDEX]
        )
        == " 2<|im_end|>"
    )
    r_all = lm_recipe(
        "x.jsonl", prompt_column="p", completion_column="c", loss_on="all", max_length=128
    )
    f_all = tokenize(
        [{"prompt": "what is 1 plus 1 ?", "completion": " 2"}], r_all, tok, None
    ).features[0]
    assert IGNORE_INDEX not in f_all["labels"]


def test_truncation_is_counted_and_examples_without_target_dropped(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    r = lm_recipe("x.jsonl", prompt_column="p", completion_column="c", max_length=8)
    long_prompt = {"prompt": "what is " * 20, "completion": "x"}
    short = {"prompt": "hi", "completion": " there"}
    out = tokenize([long_prompt, short], r, tok, None)
    assert out.truncated == 1 and out.dropped_no_target == 1 and len(out.features) == 1
    assert "1 dropped" in out.summary(8)

    rc = cls_recipe("x.csv", max_length=6)
    btok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    cls_out = tokenize(
        [{"text": "the film was good " * 5, "label": "pos"}, {"text": "bad", "label": "neg"}],
        rc,
        btok,
        {"neg": 0, "pos": 1},
    )
    assert cls_out.truncated == 1 and max(len(f["input_ids"]) for f in cls_out.features) == 6
    assert [f["labels"] for f in cls_out.features] == [1, 0]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.yml", "- text: [unclosed\n", "cannot read as yaml"),
        ("scalar.json", "42", "expected a JSON list of records, found a int"),
    ],
)
def test_malformed_files_are_one_data_error(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_file(str(p))


def test_a_split_too_small_to_stratify_is_a_data_error_not_sklearns(tmp_path):
    """12 examples of 4 labels with 9 held out leave 3 for training: fewer than the labels."""
    rows = [{"text": f"text {i}", "label": f"l{i % 4}"} for i in range(12)]
    p = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match="have no training example after splitting"):
        prepare(cls_recipe(p, split={"validation": 0.0, "test": 0.75, "seed": 0}))


def test_a_broken_gguf_file_is_one_source_error(tmp_path):
    from ftcli.sources import local_model_dir, resolve_model

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SourceError, match="cannot convert this GGUF file"):
        local_model_dir(resolve_model(str(bad)))
    assert not list((tmp_path.parent / "ftcli-cache").glob("gguf/.tmp-*"))  # nothing half-written


def test_a_damaged_json_record_is_one_user_error(tmp_path):
    from ftcli.util import read_json

    p = tmp_path / "run.json"
    p.write_text('{"status": "completed",')  # cut off mid-write by an older tool, or edited by hand
    with pytest.raises(FtcliError, match="run.json: not valid JSON") as exc:
        read_json(p)
    assert "recreate it" in exc.value.render()
