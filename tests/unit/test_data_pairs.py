"""Preference and reward data (ftcli/data/pairs.py): every layout prepares to the canonical pairs
and KTO rows; each kind of bad row is counted and dropped (an error naming the first when none is
left); the features label only answer tokens after one shared prompt; truncation that leaves no
answer is counted; the parallel tokenizer path and the cache key see the task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftcli.data import pairs
from ftcli.data import tokenize as tk
from ftcli.data.examples import load_prepared, prepare, save_prepared
from ftcli.data.prepared import read_data, write_data
from ftcli.data.rows import Rows
from ftcli.errors import DataError, RecipeError
from ftcli.recipe import recipe_from_mapping
from tests.conftest import _train_tokenizer

SPLIT = {"validation": 0.0, "test": 0.25, "seed": 0}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with a ChatML template; EOS is <|im_end|>."""
    return _train_tokenizer("bpe", tmp_path_factory.mktemp("tok"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(path, task="preference", kto=False, **data):
    r = recipe_from_mapping(
        {
            "name": "p",
            "task": task,
            "model": {"name": "m"},
            "data": {"path": str(path), "split": SPLIT, "max_length": 64, **data},
            "method": {"kind": "full"},
        }
    )
    if kto:  # preference.loss kto (the section is the engine's; only .loss is read here)
        r = r.model_copy(update={"preference": SimpleNamespace(loss="kto")})
    return r


def _u(text):
    return [{"role": "user", "content": text}]


def _a(text):
    return {"role": "assistant", "content": text}


def _filler(n):
    return [
        {"prompt": f"filler question {i} ?", "chosen": f"yes {i}", "rejected": f"no {i}"}
        for i in range(n)
    ]


def _all(prepared):
    return [e for s in ("train", "validation", "test") for e in prepared.splits[s]]


# --------------------------------------------------------------------------- layouts


LAYOUTS = {  # layout -> (the record of question i, data keys, its canonical pair)
    "plain text": (
        lambda i: {"prompt": f"What is {i}+2?", "chosen": " 4", "rejected": " 5"},
        {},
        lambda i: {"prompt": f"What is {i}+2?", "chosen": "4", "rejected": "5"},
    ),
    "whole conversations": (
        lambda i: {
            "chosen": [*_u(f"Hi {i}"), _a("Hello!")],
            "rejected": [*_u(f"Hi {i}"), _a("Go away.")],
        },
        {},
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
    ),
    "message prompt, assistant messages": (
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": _a("Hello!"), "rejected": [_a("Go away.")]},
        {},
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
    ),
    "message prompt, text answers": (
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
        {},
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
    ),
    "messages_column ending in the chosen turn (chat's /fix rows)": (
        lambda i: {"messages": [*_u(f"Hi {i}"), _a("Hello!")], "rejected": "Go away."},
        {"messages_column": "messages"},
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
    ),
    "messages_column as the prompt, chosen and rejected columns": (
        lambda i: {"messages": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": _a("Go away.")},
        {"messages_column": "messages"},
        lambda i: {"prompt": _u(f"Hi {i}"), "chosen": "Hello!", "rejected": "Go away."},
    ),
    "renamed columns": (
        lambda i: {"q": f"Hi {i}", "good": "Hello!", "worse": "Go away."},
        {"prompt_column": "q", "chosen_column": "good", "rejected_column": "worse"},
        lambda i: {"prompt": f"Hi {i}", "chosen": "Hello!", "rejected": "Go away."},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_each_pair_layout_prepares_to_the_canonical_pair(tmp_path, layout):
    record, data, want = LAYOUTS[layout]
    path = _jsonl(tmp_path / "p.jsonl", [record(i) for i in range(8)])
    prepared = prepare(_recipe(path, **data))
    got = sorted(json.dumps(e, sort_keys=True) for e in _all(prepared))
    assert got == sorted(json.dumps(want(i), sort_keys=True) for i in range(8))
    assert prepared.stats["layout"] == "pairs"


def test_kto_rows_prepare_with_every_label_spelling_and_pairs_stay_pairs(tmp_path):
    labels = [True, False, 1, 0, "desirable", "undesirable", "good", "bad", "chosen", "rejected"]
    rows = [
        {
            "prompt": _u(f"q{i}") if i % 2 else f"q{i}",
            "completion": _a(f"a{i}") if i % 3 else f"a{i}",
            "label": lab,
        }
        for i, lab in enumerate(labels)
    ]
    rows.append({"prompt": "paired", "chosen": "yes", "rejected": "no"})
    prepared = prepare(_recipe(_jsonl(tmp_path / "k.jsonl", rows), kto=True))
    got = {json.dumps(e["prompt"]): e for e in _all(prepared)}
    for i, lab in enumerate(labels):
        e = got[json.dumps(_u(f"q{i}") if i % 2 else f"q{i}")]
        assert e == {
            "prompt": e["prompt"],
            "completion": f"a{i}",
            "desirable": lab in (True, 1, "desirable", "good", "chosen"),
        }
    assert got['"paired"'] == {"prompt": "paired", "chosen": "yes", "rejected": "no"}
    assert prepared.stats["layout"] == "pairs and kto rows"


def test_an_unknown_kto_label_is_an_error_naming_the_record(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": "good"}] * 3
    rows.append({"prompt": "q2", "completion": "a", "label": "maybe"})
    with pytest.raises(DataError, match=r"record 4: 'label' is 'maybe', not a KTO label"):
        prepare(_recipe(_jsonl(tmp_path / "k.jsonl", rows), kto=True))


def test_missing_columns_are_named_at_their_keys(tmp_path):
    with pytest.raises(
        RecipeError, match=r"data.rejected_column: column 'rejected' is not in the data"
    ):
        prepare(_recipe(_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "a"}] * 4)))
    with pytest.raises(
        RecipeError, match=r"data.prompt_column: column 'prompt' is not in the data"
    ):
        prepare(_recipe(_jsonl(tmp_path / "b.jsonl", [{"chosen": "a", "rejected": "b"}] * 4)))
    with pytest.raises(RecipeError, match=r"data.label_column: column 'label'"):
        prepare(
            _recipe(
                _jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "completion": "a"}] * 4), kto=True
            )
        )


# --------------------------------------------------------------------------- bad input


def test_each_bad_row_kind_is_counted_and_dropped_in_its_own_line(tmp_path):
    from ftcli.pipeline import data_table

    bad = [
        {"prompt": "same", "chosen": "x", "rejected": "x"},
        {"prompt": "same2", "chosen": "  x ", "rejected": "x"},  # equal once stripped
        {"prompt": "empty", "chosen": "", "rejected": "x"},
        {"prompt": "missing", "chosen": "x"},
        {"chosen": [*_u("Hi"), _a("A")], "rejected": [*_u("Ho"), _a("B")]},  # prompts differ
        {"chosen": [*_u("Hi"), _a("A")], "rejected": [*_u("Hi"), *_u("B")]},  # no answer turn
        {"prompt": "kto", "completion": "a", "label": True},  # unpaired with loss dpo
    ]
    path = _jsonl(tmp_path / "p.jsonl", [*_filler(8), *bad])
    prepared = prepare(_recipe(path))
    dropped = prepared.stats["dropped"]
    assert {k: dropped[k] for k in pairs.BAD_WORDS} == {
        "mismatched_prompts": 2,
        "empty_completion": 2,
        "chosen_equals_rejected": 2,
        "unpaired": 1,
    }
    assert sum(prepared.stats["sizes"].values()) == 8
    assert prepared.stats["read"] == 15
    rows = dict(data_table(prepared, {s: _Summary() for s in prepared.splits}, 64))
    line = rows["dropped"]
    for words in (
        "2 mismatched prompts",
        "2 empty completion",
        "2 chosen equals rejected",
        "1 unpaired",
    ):
        assert words in line


class _Summary:
    def summary(self, max_length):
        return ""


def test_a_messages_pair_with_mismatched_prompts_is_dropped(tmp_path):
    rows = [
        {"chosen": [*_u(f"q{i}"), _a("yes")], "rejected": [*_u(f"q{i}"), _a("no")]}
        for i in range(6)
    ]
    rows.append({"chosen": [*_u("Hello"), _a("yes")], "rejected": [*_u("Goodbye"), _a("no")]})
    prepared = prepare(_recipe(_jsonl(tmp_path / "m.jsonl", rows)))
    assert prepared.stats["dropped"]["mismatched_prompts"] == 1
    assert all(e["prompt"] != _u("Hello") and e["prompt"] != _u("Goodbye") for e in _all(prepared))
    assert sum(prepared.stats["sizes"].values()) == 6


def test_nothing_left_is_an_error_naming_the_first_bad_row(tmp_path):
    rows = [
        {"chosen": [*_u("a"), _a("x")], "rejected": [*_u("b"), _a("y")]},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as exc:
        prepare(_recipe(path))
    msg = exc.value.message
    assert "no examples left" in msg and "1 mismatched prompts, 1 chosen equals rejected" in msg
    assert (
        f"the first bad row: {path}: record 1: its chosen and rejected conversations differ" in msg
    )


def test_duplicates_are_whole_pairs(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # the same pair: dropped
        {"prompt": "q", "chosen": "a", "rejected": "c"},  # another rejected: kept
        *_filler(5),
    ]
    prepared = prepare(_recipe(_jsonl(tmp_path / "d.jsonl", rows)))
    assert prepared.stats["dropped"]["duplicate"] == 1
    assert sum(prepared.stats["sizes"].values()) == 7


def test_splits_round_trip_through_arrow_and_jsonl(tmp_path):
    rows = [
        {"prompt": _u(f"q{i}") if i % 2 else f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}
        for i in range(12)
    ]
    prepared = prepare(_recipe(_jsonl(tmp_path / "r.jsonl", rows)), folder=tmp_path / "w")
    assert isinstance(prepared.splits["train"], Rows)
    saved = save_prepared(prepared, tmp_path / "data")
    back = load_prepared(tmp_path / "data")
    for s in ("train", "test"):
        assert list(back.splits[s]) == list(prepared.splits[s])
    assert sorted(json.dumps(e, sort_keys=True) for e in _all(back)) == sorted(
        json.dumps(
            {"prompt": _u(f"q{i}") if i % 2 else f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"},
            sort_keys=True,
        )
        for i in range(12)
    )
    assert saved.stats["sha256"]["test"]


# --------------------------------------------------------------------------- features


def test_pair_features_label_only_the_answers_after_one_shared_prompt(tmp_path, tok):
    rows = [
        {"prompt": "what is 2 plus 2 ?", "chosen": " 4", "rejected": " 5 or so"},
        {"prompt": _u("hello there"), "chosen": "how are you", "rejected": "go away now"},
    ]
    r = _recipe(tmp_path / "unused.jsonl")
    feats = tk.tokenize(rows, r, tok, None).features
    assert len(feats) == 2
    for f, row in zip(feats, rows, strict=True):
        for side in ("chosen", "rejected"):
            ids, labels = f[f"{side}_input_ids"], f[f"{side}_labels"]
            assert len(ids) == len(labels)
            n_prompt = next(i for i, t in enumerate(labels) if t != -100)
            assert all(t == -100 for t in labels[:n_prompt])
            assert labels[n_prompt:] == ids[n_prompt:]  # every answer token is a target
            answer = tok.decode(ids[n_prompt:])
            assert row[side].strip() in answer and "<|im_end|>" in answer
        c, rj = f["chosen_input_ids"], f["rejected_input_ids"]
        n_c = f["chosen_labels"].index(next(t for t in f["chosen_labels"] if t != -100))
        n_r = f["rejected_labels"].index(next(t for t in f["rejected_labels"] if t != -100))
        assert n_c == n_r and c[:n_c] == rj[:n_r]  # the same prompt tokens on both sides
    chat = feats[1]
    text = tok.decode(chat["chosen_input_ids"])
    assert (
        text
        == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhow are you<|im_end|>\n"
    )
    prompt_len = chat["chosen_labels"].count(-100)
    assert tok.decode(chat["chosen_input_ids"][:prompt_len]).endswith("<|im_start|>assistant\n")
    assert list(feats.lengths) == [
        max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in feats
    ]


def test_eos_follows_add_eos(tmp_path, tok):
    ex = [{"prompt": "q ?", "chosen": " yes", "rejected": " no"}]
    on = tk.tokenize(ex, _recipe(tmp_path / "x.jsonl"), tok, None).features[0]
    off = tk.tokenize(ex, _recipe(tmp_path / "x.jsonl", add_eos=False), tok, None).features[0]
    assert on["chosen_input_ids"][-1] == tok.eos_token_id
    assert off["chosen_input_ids"] == on["chosen_input_ids"][:-1]


def test_truncation_cuts_answers_alike_and_counts_pairs_left_without_one(tmp_path, tok):
    long_prompt = "the film was really quite good and the plot " * 3
    ex = [
        {"prompt": "q ?", "chosen": " yes indeed it was a very good film", "rejected": " no"},
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
    ]
    n = len(tok(long_prompt)["input_ids"])
    assert n > 12
    t = tk.tokenize(ex, _recipe(tmp_path / "x.jsonl", max_length=12), tok, None)
    assert t.dropped_no_target == 1 and t.truncated == 2 and len(t.features) == 1
    f = t.features[0]
    assert len(f["chosen_input_ids"]) == 12  # the answer's end cut, the prompt whole
    assert f["chosen_input_ids"][:3] == f["rejected_input_ids"][:3]
    assert "dropped (no answer token left after truncation)" in t.summary(12)


def test_a_split_truncation_empties_is_an_error_naming_its_first_row(tmp_path, tok):
    long = "the film was really quite good and the plot " * 4
    rows = [{"prompt": f"{long} {i}", "chosen": " yes", "rejected": " no"} for i in range(8)]
    r = _recipe(_jsonl(tmp_path / "t.jsonl", rows), max_length=8)
    (tmp_path / "out").mkdir()
    with pytest.raises(
        DataError,
        match=r"the train split: truncation at data.max_length 8 left none of its 6 examples an answer token; its row 1 has a \d+-token prompt",
    ):
        write_data(r, tok, tmp_path / "out")


def test_kto_features_split_pairs_into_a_desirable_and_an_undesirable_row(tmp_path, tok):
    ex = [
        {"prompt": "q ?", "chosen": " yes", "rejected": " no"},
        {"prompt": _u("hi"), "completion": "hello", "desirable": False},
    ]
    feats = tk.tokenize(ex, _recipe(tmp_path / "x.jsonl", kto=True), tok, None).features
    assert [f["desirable"] for f in feats] == [1, 0, 0]
    assert [tok.decode([t for t in f["labels"] if t != -100]) for f in feats] == [
        " yes<|im_end|>",
        " no<|im_end|>",
        "hello<|im_end|>\n",
    ]
    assert all(f["input_ids"] and len(f["input_ids"]) == len(f["labels"]) for f in feats)


def test_max_length_auto_measures_the_longer_side(tmp_path, tok):
    rows = [
        {"prompt": f"q {i} ?", "chosen": " yes", "rejected": " no " + "very " * 40}
        for i in range(12)
    ]
    r = _recipe(_jsonl(tmp_path / "a.jsonl", rows), max_length="auto")
    (tmp_path / "out").mkdir()
    write_data(r, tok, tmp_path / "out")
    prepared, tokenized = read_data(tmp_path / "out")
    chosen = prepared.stats["max_length"]["value"]
    longest = max(len(f["rejected_input_ids"]) for f in tokenized["train"].features)
    assert chosen >= longest > 40 and tokenized["train"].truncated == 0


def test_the_parallel_path_gives_the_serial_features(tmp_path, tok):
    rows = [
        {
            "prompt": _u(f"what is {i} plus 1 ?") if i % 3 else f"q {i}",
            "chosen": f" {i + 1}",
            "rejected": f" {i + 2} maybe",
        }
        for i in range(1400)
    ]
    path = _jsonl(tmp_path / "big.jsonl", rows)
    prepared = prepare(_recipe(path, num_proc=2), folder=tmp_path / "w")
    train = prepared.splits["train"]
    assert len(train) >= tk.PARALLEL_FROM
    two = tk.tokenize(train, _recipe(path, num_proc=2), tok, None)
    one = tk.tokenize(list(train)[:50], _recipe(path, num_proc=1), tok, None)
    listed = tk.tokenize(list(train), _recipe(path, num_proc=2), tok, None)
    assert list(two.features)[:50] == list(one.features)
    assert list(listed.features) == list(two.features)


def test_the_cache_key_tells_tasks_and_kto_apart(tmp_path, tok):
    from ftcli.data.store import task_part

    path = tmp_path / "p.jsonl"
    assert task_part(_recipe(path)) == "preference"
    assert task_part(_recipe(path, task="reward")) == "reward"
    assert task_part(_recipe(path, kto=True)) == "preference:kto"
    sft = recipe_from_mapping(
        {
            "name": "s",
            "task": "causal_lm",
            "model": {"name": "m"},
            "data": {"path": str(path)},
            "method": {"kind": "full"},
        }
    )
    assert task_part(sft) == "causal_lm"


# --------------------------------------------------------------------------- recipe keys


def test_pair_columns_apply_to_preference_and_reward_only(tmp_path):
    base = {"name": "p", "model": {"name": "m"}, "method": {"kind": "full"}}
    with pytest.raises(
        RecipeError, match=r"data.chosen_column: only applies to task preference or reward"
    ):
        recipe_from_mapping(
            {**base, "task": "causal_lm", "data": {"path": "x.jsonl", "chosen_column": "c"}}
        )
    with pytest.raises(
        RecipeError, match=r"data.label_column: only applies to task classification, or preference"
    ):
        recipe_from_mapping(
            {**base, "task": "reward", "data": {"path": "x.jsonl", "label_column": "l"}}
        )
    with pytest.raises(
        RecipeError, match=r"data.streaming: preference and reward data is prepared whole"
    ):
        recipe_from_mapping(
            {
                **base,
                "task": "preference",
                "data": {"path": "x.jsonl", "streaming": True},
                "train": {"max_steps": 5},
            }
        )
    with pytest.raises(RecipeError, match=r"data.rejected_column: is the chosen column too"):
        recipe_from_mapping(
            {**base, "task": "preference", "data": {"path": "x.jsonl", "rejected_column": "chosen"}}
        )
    r = recipe_from_mapping(
        {
            **base,
            "task": "preference",
            "data": {
                "path": "x.jsonl",
                "prompt_column": "q",
                "label_column": "l",
                "completion_column": "c",
                "system_prompt": "Be kind.",
            },
        }
    )
    assert r.data.chosen_column == "chosen" and r.data.rejected_column == "rejected"


def test_a_system_prompt_leads_message_prompts(tmp_path):
    rows = [{"prompt": _u(f"q{i}"), "chosen": "a", "rejected": "b"} for i in range(4)]
    rows.append({"prompt": "text prompt", "chosen": "a", "rejected": "b"})
    prepared = prepare(_recipe(_jsonl(tmp_path / "s.jsonl", rows), system_prompt="Be kind."))
    for e in _all(prepared):
        if isinstance(e["prompt"], list):
            assert e["prompt"][0] == {"role": "system", "content": "Be kind."}
        else:
            assert e["prompt"] == "text prompt"


def test_prepare_reports_the_drops_and_caches_preference_data(tmp_path, capsys):
    """`ftcli prepare` on pairs: the bad rows in data.json's dropped, the second run cached, and
    an answer that is a number is not taken for a wrong column by validate."""
    from transformers import LlamaConfig

    from tests.conftest import run_cli, write_recipe

    model = tmp_path / "model"
    _train_tokenizer("bpe", model)
    LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=256,
    ).save_pretrained(model)
    rows = [
        {"prompt": f"what is {i} plus 2 ?", "chosen": f"{i + 2}", "rejected": f"{i + 3}"}
        for i in range(10)
    ]
    rows.append({"prompt": "same", "chosen": "1", "rejected": "1"})
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        name="p",
        task="preference",
        model={"name": str(model)},
        data={"path": str(data), "split": SPLIT},
        method={"kind": "lora"},
    )
    code, out = run_cli(capsys, "validate", str(recipe))
    assert code == 0 and "data columns" in out["checked"], out
    code, out = run_cli(capsys, "prepare", str(recipe))
    assert code == 0 and not out["cached"]
    assert out["data"]["train"]["examples"] + out["data"]["test"]["examples"] == 10
    code, again = run_cli(capsys, "prepare", str(recipe))
    assert again["cached"] and again["key"] == out["key"]


def test_unpaired_rows_only_with_a_pair_loss_is_an_error_naming_the_fix(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(6)]
    with pytest.raises(DataError) as exc:
        prepare(_recipe(_jsonl(tmp_path / "k.jsonl", rows)))
    assert (
        "6 unpaired" in exc.value.message and "record 1: an unpaired (KTO) row" in exc.value.message
    )
    assert "--set preference.loss=kto" in exc.value.hint
