"""data.sources (a mixture): weights honoured, each source's own columns and layout, its own
sealed test slice, per-source counts, located recipe errors, and a cache key over every source."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ftcli.data import store
from ftcli.data.examples import prepare
from ftcli.data.mixture import draw, shares
from ftcli.errors import RecipeError
from ftcli.recipe import load_recipe, recipe_from_mapping
from tests.conftest import _train_tokenizer, chat_rows


def _csv(path: Path, n: int, tag: str) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "sentiment"])
        w.writeheader()
        for i in range(n):
            w.writerow({"review": f"{tag} review {i}", "sentiment": "pos" if i % 2 else "neg"})
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tweets(path: Path, n: int) -> Path:
    return _jsonl(path, [{"t": f"tweet {i}", "y": "pos" if i % 3 else "neg"} for i in range(n)])


def _cls(tmp_path: Path, sources: list[dict], **data) -> object:
    return recipe_from_mapping(
        {
            "name": "mix",
            "task": "classification",
            "model": {"name": "some/model"},
            "method": {"kind": "lora"},
            "data": {"sources": sources, "max_length": 32, **data},
        }
    )


def _by_source(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return out


def test_shares_are_exact_and_draws_repeat_only_past_the_pool():
    assert shares([0.8, 0.2], 1000) == [800, 200]
    assert shares([1, 1, 1], 10) == [4, 3, 3] and sum(shares([3, 7, 11], 997)) == 997
    import numpy as np

    rows, repeats = draw(np.arange(10), 25, "s")
    assert len(rows) == 25 and repeats == 15 and set(rows.tolist()) == set(range(10))
    rows, repeats = draw(np.arange(10), 4, "s")
    assert len(set(rows.tolist())) == 4 and repeats == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_are_honoured_in_the_training_split(tmp_path, seed):
    a = _csv(tmp_path / "a.csv", 1500, "a")
    b = _tweets(tmp_path / "b.jsonl", 1500)
    src = [
        {"path": str(a), "text_column": "review", "label_column": "sentiment", "weight": 0.8},
        {"path": str(b), "text_column": "t", "label_column": "y", "weight": 0.2},
    ]
    p = prepare(_cls(tmp_path, src, max_train_examples=1000, split={"seed": seed}))
    got = _by_source(p.splits["train"])
    assert sum(got.values()) == 1000
    # exact shares: well inside the binomial tolerance (3 sd = 38) of a per-example draw
    assert abs(got["a"] - 800) <= 1 and abs(got["b"] - 200) <= 1
    assert p.stats["sources"]["a"]["sizes"]["train"] == got["a"]
    # the order is mixed, not source after source
    first = [r["source"] for r in p.splits["train"][:100]]
    assert 50 < first.count("a") < 100
    # validation and test keep each source's own held-out slice (10% of each, not weighted)
    assert _by_source(p.splits["test"]) == {"a": 150, "b": 150}
    assert _by_source(p.splits["validation"]) == {"a": 150, "b": 150}


def test_the_seed_changes_which_examples_and_a_small_source_weighted_up_repeats(tmp_path):
    a = _csv(tmp_path / "a.csv", 300, "a")
    b = _tweets(tmp_path / "b.jsonl", 50)
    src = [
        {"path": str(a), "text_column": "review", "label_column": "sentiment", "weight": 1},
        {"path": str(b), "text_column": "t", "label_column": "y", "weight": 1},
    ]
    p0 = prepare(_cls(tmp_path, src, split={"seed": 0}))
    p1 = prepare(_cls(tmp_path, src, split={"seed": 1}))
    train = list(p0.splits["train"])
    got = _by_source(train)
    assert got["a"] == got["b"] == len(train) // 2  # equal shares of the sum of the pools
    b_pool = (
        50
        - p0.stats["sources"]["b"]["sizes"]["test"]
        - p0.stats["sources"]["b"]["sizes"]["validation"]
    )
    assert p0.stats["sources"]["b"]["repeated"] == got["b"] - b_pool
    assert [r["text"] for r in p0.splits["test"]] != [r["text"] for r in p1.splits["test"]]
    # no example of the sealed test split is trained on, repeats or not
    assert not {r["text"] for r in p0.splits["test"]} & {r["text"] for r in train}


def test_each_source_reads_its_own_columns_and_layout_into_messages(tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    inst = _jsonl(
        tmp_path / "inst.jsonl",
        [{"q": f"question {i}", "a": f"answer {i}", "ctx": f"context {i}"} for i in range(40)],
    )
    r = recipe_from_mapping(
        {
            "name": "mixlm",
            "task": "causal_lm",
            "model": {"name": "some/model"},
            "method": {"kind": "lora"},
            "data": {
                "sources": [
                    {"path": str(chat), "messages_column": "messages", "name": "chat"},
                    {
                        "path": str(inst),
                        "instruction_column": "q",
                        "input_column": "ctx",
                        "output_column": "a",
                        "system_prompt": "be brief",
                    },
                ],
                "max_length": 64,
            },
        }
    )
    p = prepare(r)
    rows = list(p.splits["train"]) + list(p.splits["test"])
    assert {e["source"] for e in rows} == {"chat", "inst"}
    inst_rows = [e for e in rows if e["source"] == "inst"]
    assert all(set(e) == {"messages", "source"} for e in rows)
    e = inst_rows[0]
    n = e["messages"][1]["content"].split()[1]
    assert e["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"question {n}\n\ncontext {n}"},
        {"role": "assistant", "content": f"answer {n}"},
    ]
    chat_rows_ = [e for e in rows if e["source"] == "chat"]
    assert all(m["role"] != "system" for e in chat_rows_ for m in e["messages"])
    assert p.stats["sources"]["inst"]["layout"] == "instruction"
    assert p.stats["sources"]["chat"]["read"] == 40


def test_classification_sources_with_own_columns_counts_and_cross_source_dedupe(tmp_path):
    a = _csv(tmp_path / "a.csv", 100, "a")
    b = _jsonl(
        tmp_path / "b.jsonl",
        [{"t": f"a review {i}", "y": "pos" if i % 2 else "neg"} for i in range(10)]  # a's copies
        + [{"t": f"tweet {i}", "y": "pos" if i % 2 else "neg"} for i in range(90)],
    )
    src = [
        {"path": str(a), "text_column": "review", "label_column": "sentiment", "max_examples": 30},
        {"path": str(b), "text_column": "t", "label_column": "y"},
    ]
    p = prepare(_cls(tmp_path, src))
    s = p.stats["sources"]
    assert s["a"]["read"] == 100 and s["b"]["read"] == 100
    assert s["b"]["duplicate"] == 10 and s["b"]["kept"] == 90  # the first source's copy wins
    assert s["a"]["sizes"]["train"] == 30  # capped by its max_examples
    assert s["b"]["sizes"]["train"] == 90 - s["b"]["sizes"]["test"] - s["b"]["sizes"]["validation"]
    assert p.labels == ["neg", "pos"]
    assert all(r["text"].startswith("a review") for r in p.splits["test"] if r["source"] == "a")


def _problems(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(f)
    return [p.render() for p in exc.value.problems]


HEAD = """name: mix
task: classification
model: {name: some/model}
method: {kind: lora}
data:
"""


def test_data_path_and_data_sources_together_is_an_error_at_the_key(tmp_path):
    _csv(tmp_path / "a.csv", 10, "a")
    got = _problems(
        tmp_path,
        HEAD + "  path: a.csv\n  sources:\n    - {path: a.csv}\n",
    )
    assert len(got) == 1
    assert got[0].startswith(f"{tmp_path}/recipe.yaml:7: data.sources: conflicts with data.path")


def test_mixture_recipe_errors_are_located(tmp_path):
    got = _problems(
        tmp_path,
        HEAD
        + "  text_column: body\n"
        + "  sources:\n"
        + "    - {path: a.csv, weight: 2, max_examples: 5}\n"
        + "    - {path: b.csv}\n"
        + "    - {path: c.csv, name: x, weight: 1}\n"
        + "    - {path: d.csv, name: x, weight: 1, messages_column: m}\n",
    )
    text = "\n".join(got)
    assert "recipe.yaml:6: data.text_column: with data.sources, each source names its own" in text
    assert "recipe.yaml:8: data.sources.0.max_examples: conflicts with its weight" in text
    assert "recipe.yaml:9: data.sources.1: has no weight while other sources have one" in text
    assert "recipe.yaml:11: data.sources.3.name: data.sources.2 has that name already" in text
    assert "data.sources.3.messages_column: only applies to task causal_lm" in text


def test_a_causal_mixture_of_plain_text_and_messages_is_an_error(tmp_path):
    got = _problems(
        tmp_path,
        HEAD.replace("classification", "causal_lm")
        + "  sources:\n    - {path: a.jsonl, messages_column: m}\n    - {path: b.txt}\n",
    )
    assert any(
        "data.sources.1: its examples are plain text, data.sources.0's are messages" in g
        for g in got
    ), got


def test_a_missing_column_and_a_missing_file_are_located_at_their_source(tmp_path):
    _csv(tmp_path / "a.csv", 20, "a")
    f = tmp_path / "recipe.yaml"
    f.write_text(
        HEAD
        + "  sources:\n    - {path: a.csv, text_column: review, label_column: sentiment}\n    - {path: a.csv, text_column: reviw, label_column: sentiment}\n"
    )
    with pytest.raises(RecipeError) as exc:
        prepare(load_recipe(f))
    (p,) = exc.value.problems
    assert (
        p.key == "data.sources.1.text_column"
        and p.line == 8
        and "did you mean 'review'" in (p.hint or "")
    )
    f.write_text(HEAD + "  sources:\n    - {path: nothere.csv}\n")
    with pytest.raises(RecipeError) as exc:
        prepare(load_recipe(f))
    (p,) = exc.value.problems
    assert p.key == "data.sources.0.path" and "'nothere.csv' was looked for in" in (p.hint or "")


def test_the_resolved_recipe_reloads_and_names_sources_from_their_paths(tmp_path):
    _csv(tmp_path / "a.csv", 10, "a")
    f = tmp_path / "recipe.yaml"
    f.write_text(
        HEAD + "  sources:\n    - {path: a.csv, weight: 3}\n    - {path: sub/a.csv, weight: 1}\n"
    )
    r = load_recipe(f)
    assert r.data.sources[0].path == str(tmp_path / "a.csv")  # anchored at the recipe's folder
    assert r.data.where == "2 sources: a, a-2"
    (tmp_path / "again.yaml").write_text(r.to_yaml())
    again = load_recipe(tmp_path / "again.yaml")
    assert again.data == r.data and "path:" not in r.to_yaml().split("sources:")[0]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    _train_tokenizer("bpe", folder)
    return folder


def test_the_cache_key_covers_every_source_file(tmp_path, tok_dir, monkeypatch):
    from ftcli.models import tokenizer_from

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    a = _csv(tmp_path / "a.csv", 40, "a")
    b = _tweets(tmp_path / "b.jsonl", 40)
    src = [
        {"path": str(a), "text_column": "review", "label_column": "sentiment"},
        {"path": str(b), "text_column": "t", "label_column": "y"},
    ]
    r = recipe_from_mapping(
        {
            "name": "mixc",
            "task": "classification",
            "model": {"name": str(tok_dir)},
            "method": {"kind": "lora"},
            "data": {"sources": src, "max_length": 32},
        }
    )
    tok = tokenizer_from(tok_dir)
    p1, _, note = store.load_data(r, tok, str(tok_dir))
    assert note.startswith("prepared ") and set(p1.stats["sources"]) == {"a", "b"}
    assert store.load_data(r, tok, str(tok_dir))[2].startswith("cached ")
    _tweets(b, 41)  # the second source changes
    p2, _, note = store.load_data(r, tok, str(tok_dir))
    assert note.startswith("prepared ") and "source data.sources.1.path changed" in note
    assert p2.stats["sources"]["b"]["read"] == 41
    # a new name for a source is a new key: its examples carry the name
    named = r.model_copy(
        update={
            "data": r.data.model_copy(
                update={
                    "sources": [
                        r.data.sources[0].model_copy(update={"name": "x"}),
                        r.data.sources[1],
                    ]
                }
            )
        }
    )
    p3, _, note = store.load_data(named, tok, str(tok_dir))
    assert note.startswith("prepared ") and set(p3.stats["sources"]) == {"x", "b"}


def test_worker_processes_read_the_sources_to_the_same_splits(tmp_path, monkeypatch):
    """Sources read by worker processes (byte ranges of each jsonl file; the csv in this one):
    the same splits, source names, labels and counts as read in one process."""
    from tests.unit.test_data_arrow import _parallel_reads

    a = _csv(tmp_path / "a.csv", 100, "a")
    b = _jsonl(
        tmp_path / "b.jsonl",
        [{"t": f"a review {i}", "y": "pos" if i % 2 else "neg"} for i in range(10)]
        + [{"t": f"tweet {i}", "y": "pos" if i % 2 else "neg"} for i in range(300)]
        + [{"t": f"odd {i}", "y": "meh"} for i in range(40)],
    )
    c = _jsonl(tmp_path / "c.jsonl", [{"t": f"tweet {i}", "y": "neg"} for i in range(150, 260)])
    src = [
        {"path": str(a), "text_column": "review", "label_column": "sentiment", "max_examples": 30},
        {"path": str(b), "text_column": "t", "label_column": "y"},
        {"path": str(c), "text_column": "t", "label_column": "y"},
    ]
    r = _cls(tmp_path, src)
    want = prepare(r)
    done = _parallel_reads(monkeypatch, 500)
    got = prepare(r)
    assert done.count(True) == 2  # both jsonl sources by the workers; the csv in this process
    assert json.dumps(got.stats) == json.dumps(want.stats) and got.labels == want.labels
    for s in ("train", "validation", "test"):
        assert list(got.splits[s]) == list(want.splits[s])
