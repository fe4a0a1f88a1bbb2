"""``data.streaming: true``: hash splits stable across runs and disjoint, the recipe errors, short
streamed training runs (classification; causal LM with packing) that leave a test.jsonl
``ftcli eval`` reads, flat memory over a long stream, and ``--resume`` replaying the stream."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcli.data.stream import (
    Counts,
    StreamedBatches,
    bucket,
    examples,
    scan,
    split_hash,
    train_examples,
)
from ftcli.errors import FtcliError, Interrupted, RecipeError
from ftcli.pipeline import evaluate_run, train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import chat_rows, run_cli, sentiment_rows, tiny_recipe


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _streamed(tmp_path, tiny_models, tiny_data, task="classification", rows=None, **data):
    m = tiny_recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        task=task,
        arch="llama-random" if task == "classification" else "llama",
    )
    if rows is None:
        rows = sentiment_rows(600) if task == "classification" else _distinct_chat(400)
    m["data"]["path"] = str(_jsonl(tmp_path / f"{task}.jsonl", rows))
    m["data"].update({"streaming": True, "shuffle_buffer": 64, **data})
    m["train"].pop("epochs")
    m["train"].update(max_steps=6, batch_size=8)
    m["merge"] = {"enabled": False}
    return m


def _distinct_chat(n: int) -> list[dict]:
    rows = chat_rows(n)
    for i, r in enumerate(rows):
        r["messages"][0]["content"] += f" ({i})"
    return rows


def test_hash_split_is_stable_disjoint_and_reseeded(tmp_path, tiny_models, tiny_data):
    m = _streamed(tmp_path, tiny_models, tiny_data, rows=sentiment_rows(3000))
    m["data"].update(max_test_examples=40, max_validation_examples=30)
    r = recipe_from_mapping(m)
    a, b = scan(r), scan(r)
    assert a.test == b.test and a.validation == b.validation  # the same split on every run
    assert len(a.test) == 40 and len(a.validation) == 30
    assert a.labels == ["neg", "pos"]
    # the first 40 test-bucket examples in stream order: every other one is in train or beyond
    seed = r.data.split.seed
    in_order = [e for e, h in examples(r, Counts()) if bucket(h) < r.data.split.test]
    assert a.test == in_order[:40]
    # training never sees a test- or validation-bucket example, anywhere in the stream
    train = list(train_examples(r, a.labels, a.held))
    width = r.data.split.test + r.data.split.validation
    assert all(bucket(split_hash(e, seed)) >= width for e in train)
    keys = {json.dumps(e, sort_keys=True) for e in train}
    assert not keys & {json.dumps(e, sort_keys=True) for e in a.test + a.validation}
    assert len(train) + len(in_order) > 2000  # the rest of the stream, beyond the caps
    # another seed draws another split
    m["data"]["split"]["seed"] = 1
    assert scan(recipe_from_mapping(m)).test != a.test


def test_streaming_needs_max_steps_and_a_streamable_format(tmp_path, tiny_models, tiny_data):
    m = _streamed(tmp_path, tiny_models, tiny_data)
    m["train"].pop("max_steps")
    with pytest.raises(RecipeError) as info:
        recipe_from_mapping(m)
    assert "train.max_steps" in info.value.message and "data.streaming" in info.value.message
    m = _streamed(tmp_path, tiny_models, tiny_data)
    m["data"]["path"] = str(tiny_data["classification"])  # a csv
    r = recipe_from_mapping(m)
    with pytest.raises(RecipeError, match=r"data.path.*jsonl and parquet"):
        scan(r)
    m = _streamed(tmp_path, tiny_models, tiny_data)
    m["data"]["augment"] = {"ops": ["swap"]}
    with pytest.raises(RecipeError, match="data.augment"):
        recipe_from_mapping(m)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_streamed_run_writes_test_jsonl_that_eval_reads(
    tmp_path, tiny_models, tiny_data, task, capsys
):
    m = _streamed(tmp_path, tiny_models, tiny_data, task=task)
    if task == "classification":
        m["train"]["optimizer"] = {"name": "adamw", "lr": 1.0e-2}
        m["train"]["max_steps"] = 30
    r = recipe_from_mapping(m)
    assert r.data.packs(r.task, r.method.kind) == (task == "causal_lm")
    out = train_run(r, UI())
    assert out["status"] == "completed" and out["train"]["steps"] == r.train.max_steps
    assert out["train"]["packed"] == (task == "causal_lm")
    data = r.run_dir / "data"
    assert (data / "test.jsonl").is_file() and (data / "validation.jsonl").is_file()
    assert not (data / "train.jsonl").exists() and not (data / "train.arrow").exists()
    assert out["data"]["tokenized"]["train"]["streamed"] is True
    test = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    assert test and len(test) == out["data"]["sizes"]["test"]
    again = evaluate_run(r.run_dir, UI())
    assert again["n"] == len(test)
    capsys.readouterr()  # what training printed
    code, shown = run_cli(capsys, "eval", str(r.run_dir))  # the command, from the folder alone
    assert code == 0, shown
    if task == "classification":
        assert again["metrics"]["accuracy"] >= 0.7, again["metrics"]


def test_the_stream_iterator_keeps_memory_flat(tmp_path, tiny_models, tiny_data):
    """50k tiny examples through the batch generator: what it holds after 5k training examples is what
    it holds after 34k (bounded buffers; no list grows with the stream)."""
    rows = [
        {"text": f"the film was good {i}", "label": "pos" if i % 2 else "neg"}
        for i in range(50_000)
    ]
    m = _streamed(tmp_path, tiny_models, tiny_data, rows=rows, shuffle_buffer=2_000)
    m["data"]["clean"] = {"dedupe": True}
    r = recipe_from_mapping(m)
    s = scan(r)
    from ftcli.models import load_tokenizer

    tok, _, _ = load_tokenizer(r.model)
    stream = StreamedBatches(r.model_copy(), tok, s.labels, s.held, packed=False)
    tracemalloc.start()
    try:
        seen, marks = 0, {}
        for b in stream.global_batches():
            seen += len(b)
            for mark in (5_000, 20_000, 34_000):
                if mark not in marks and seen >= mark:
                    marks[mark] = tracemalloc.get_traced_memory()[0]
            if stream.passes > 1:
                break
    finally:
        tracemalloc.stop()
    assert seen > 34_000
    growth = marks[34_000] - marks[5_000]
    assert growth < 4 * 2**20, f"{growth / 2**20:.1f} MiB more after 34k examples than after 5k"


def test_resume_replays_the_stream_to_the_same_next_batch(tmp_path, tiny_models, tiny_data):
    m = _streamed(tmp_path, tiny_models, tiny_data, task="causal_lm")
    r = recipe_from_mapping(m)
    s = scan(r)
    from ftcli.models import load_tokenizer

    tok, _, _ = load_tokenizer(r.model)
    stream = StreamedBatches(r, tok, None, s.held, packed=True)

    def first(n, **kw):
        it = stream.micro_batches(**kw)
        return [next(it) for _ in range(n)]

    whole = first(60)
    assert first(5, skip=55) == whole[55:60]  # --resume: the same next batches, past a pass end
    # two ranks share one sequence: every other micro-batch each
    assert first(10, rank=1, world=2) == whole[1:20:2]
    assert first(5, rank=0, world=2, skip=5) == whole[10:20:2]


class _InterruptAt:
    def __init__(self, step: int):
        self.step = step

    def start(self, total, done=0): ...
    def note(self, message): ...
    def stop(self): ...

    def update(self, step, **_):
        if step == self.step:
            raise KeyboardInterrupt


def test_streamed_resume_continues_exactly(tmp_path, tiny_models, tiny_data, monkeypatch):
    m = _streamed(tmp_path, tiny_models, tiny_data, task="causal_lm")
    m["train"].update(max_steps=8, gradient_accumulation=2, checkpoint_every=100)
    straight = recipe_from_mapping({**m, "output_dir": str(tmp_path / "a")})
    broken = recipe_from_mapping({**m, "output_dir": str(tmp_path / "b")})
    train_run(straight, UI())
    monkeypatch.setattr(UI, "progress", lambda self: _InterruptAt(3))
    with pytest.raises(Interrupted):
        train_run(broken, UI())
    monkeypatch.undo()
    with pytest.raises(FtcliError, match="already holds a run"):
        train_run(broken, UI())
    out = train_run(broken, UI(), resume=True)
    assert out["status"] == "completed" and out["train"]["resumed_from"] == 3
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken.run_dir / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    same = (straight.run_dir / "data" / "test.jsonl").read_text()
    assert same == (broken.run_dir / "data" / "test.jsonl").read_text()
