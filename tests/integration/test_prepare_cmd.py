"""``ftcli prepare`` and ``ftcli cache`` from the command line, and the cache in real runs: a
second ``train`` and a second ``tune`` trial say "cached"; a 2-process CPU run (gloo) prepares on
rank 0 only, rank 1 never tokenizes and opens the same entry."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ftcli.data.prepared as prepared_mod
from ftcli.data import store
from tests.conftest import _train_tokenizer, chat_rows, tiny_recipe, write_recipe
from tests.tmpfs import fill, small_tmpfs

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("data_worker.py")
# The stand-in prepared.py of the cache's own branch decodes every row into Python lists on
# read; the memory bound holds only for a read_data that maps its files (Arrow).
STAND_IN = "THROWAWAY" in (prepared_mod.__doc__ or "")


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory) -> Path:
    """A model folder with a tokenizer and a config but no weights: ``prepare`` must not need
    them."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("weightless")
    tok = _train_tokenizer("bpe", folder)
    LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1).save_pretrained(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def _recipe_file(tmp_path: Path, model: Path, n: int = 80, name: str = "prep") -> Path:
    data = tmp_path / f"chat-{n}.jsonl"
    rows = chat_rows(n)
    for i, r in enumerate(rows):  # each one distinct: cleaning would drop repeats
        r["messages"][0]["content"] += f" ({i})"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = {
        "name": name,
        "task": "causal_lm",
        "model": {"name": str(model)},
        "data": {
            "path": str(data),
            "messages_column": "messages",
            "split": {"validation": 0.1, "test": 0.2, "seed": 0},
            "max_length": 64,
        },
        "method": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 4, "mixed_precision": "no"},
        "output_dir": str(tmp_path / "runs"),
    }
    return write_recipe(tmp_path / f"{name}.yaml", **m)


def _cli(capsys, *args):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_prepare_fills_the_cache_prints_the_table_and_key_and_a_rerun_is_cached(
    tmp_path, weightless_model, cache, capsys, monkeypatch
):
    import ftcli.data.chat

    recipe = _recipe_file(tmp_path, weightless_model)
    code, out, err = _cli(capsys, "prepare", str(recipe))
    assert code == 0, err
    (entry,) = [p for p in cache.iterdir() if store.KEY_RE.match(p.name)]
    key = entry.name[:12]
    assert re.search(rf"^\s+prepared {key}: no entry for key {key}$", out, re.M), out
    assert "data" in out and re.search(r"train\s.*\d+ examples, [\d,]+ tokens", out), out
    assert not (tmp_path / "runs").exists()  # the data stage only: no run folder
    loads: list = []  # a hit is told without loading the tokenizer
    real = ftcli.data.chat.recipe_tokenizer
    monkeypatch.setattr(ftcli.data.chat, "recipe_tokenizer", lambda r: loads.append(r) or real(r))
    code, out, err = _cli(capsys, "prepare", str(recipe), "--json")
    assert not loads
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["cached"] and result["key"] == key
    assert result["note"] == f"cached {key}"
    assert result["data"]["train"]["examples"] > 0 and result["data"]["test"]["tokens"] > 0
    assert f"cached {key}" in err  # human lines go to stderr with --json
    code, out, err = _cli(capsys, "prepare", str(recipe), "--set", "data.max_length=32", "--json")
    assert code == 0 and json.loads(out)["note"].endswith(": recipe data section changed")


def test_a_big_source_is_read_while_the_tokenizer_loads_and_gives_the_same_entry(
    tmp_path, weightless_model, cache, capsys, monkeypatch
):
    """On a miss, ``ftcli prepare`` starts the workers on a big jsonl source before it loads the
    tokenizer, and prepare takes what they read: the same entry, byte for byte (the manifest's
    build time aside), as reading it after; nothing of the early read is left behind."""
    import ftcli.data.chat
    import ftcli.data.examples as ex
    from ftcli.data import pool

    monkeypatch.setattr(ex, "PARALLEL_READ_FROM", 0)
    monkeypatch.setattr(ex, "READ_BYTES", 2_000)
    monkeypatch.setattr(pool, "num_procs", lambda recipe: 2)
    recipe = _recipe_file(tmp_path, weightless_model, n=300)
    order: list = []
    real_tok, real_start, real_par = (
        ftcli.data.chat.recipe_tokenizer,
        ex._start_read,
        ex._read_parallel,
    )
    monkeypatch.setattr(
        ftcli.data.chat, "recipe_tokenizer", lambda r: order.append("tokenizer") or real_tok(r)
    )
    monkeypatch.setattr(ex, "_start_read", lambda *a: order.append("read") or real_start(*a))
    monkeypatch.setattr(
        ex, "_read_parallel", lambda *a: order.append(bool(ex._AHEAD)) or real_par(*a)
    )

    def files():
        """The entry's files' bytes; the manifest's without its build time (to the second, so two
        builds differ there whenever they straddle a second)."""
        (entry,) = [p for p in cache.iterdir() if store.KEY_RE.match(p.name)]
        got = {p.relative_to(entry): p.read_bytes() for p in entry.rglob("*") if p.is_file()}
        manifest = json.loads(got.pop(Path(store.MANIFEST)))
        assert manifest.pop("created")
        return got, manifest

    code, out, err = _cli(capsys, "prepare", str(recipe))
    assert code == 0, err
    assert order == ["read", "tokenizer", True]  # started first; found by prepare
    early = files()
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".ftcli-read")) == []
    for p in list(cache.iterdir()):  # the same build with the read after the tokenizer
        if store.KEY_RE.match(p.name):
            shutil.rmtree(p)
    order.clear()
    monkeypatch.setattr(store, "reading_ahead", lambda r: contextlib.nullcontext())
    code, out, err = _cli(capsys, "prepare", str(recipe))
    assert code == 0, err
    assert order == ["tokenizer", False, "read"]
    assert files() == early


def test_prepare_of_missing_data_is_one_error(tmp_path, weightless_model, cache, capsys):
    recipe = _recipe_file(tmp_path, weightless_model)
    code, out, err = _cli(capsys, "prepare", str(recipe), "--set", "data.path=nowhere.jsonl")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "nowhere.jsonl" in err


def test_prepare_on_a_full_disk_says_so_once_and_leaves_no_entry(
    tmp_path, weightless_model, monkeypatch, capsys
):
    recipe = _recipe_file(tmp_path, weightless_model, n=200)
    with small_tmpfs(tmp_path / "fs", "256k") as fs:
        monkeypatch.setenv("FTCLI_CACHE", str(fs / "cache"))
        (fs / "cache" / "data").mkdir(parents=True)
        fill(fs, leave=16 * 1024)
        code, out, err = _cli(capsys, "prepare", str(recipe))
        assert code == 1 and "Traceback" not in err
        lines = [x for x in err.splitlines() if x.strip()]
        assert lines[0].startswith("error: the disk is full: the data cache entry "), err
        assert len(lines) == 2 and lines[1].lstrip().startswith("hint: ")
        left = [p.name for p in (fs / "cache" / "data").iterdir()]
        assert not [n for n in left if store.KEY_RE.match(n) or ".tmp-" in n], left


def test_cache_lists_entries_and_clear_removes_only_ftclis(
    tmp_path, weightless_model, cache, capsys
):
    recipe = _recipe_file(tmp_path, weightless_model)
    assert _cli(capsys, "prepare", str(recipe))[0] == 0
    (cache / "my-notes").mkdir()
    (cache / "my-notes" / "a.txt").write_text("not ftcli's")
    gguf = cache.parent / "gguf" / "model-abc"  # the converted-GGUF cache beside it
    gguf.mkdir(parents=True)
    code, out, err = _cli(capsys, "cache", "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert listing["folder"] == str(cache)
    (e,) = listing["entries"]
    assert e["source"] == str(tmp_path / "chat-80.jsonl") and e["size"] > 0 and e["created"]
    assert listing["total_bytes"] == e["size"] and listing["not_ftclis"] == ["my-notes"]
    code, out, _ = _cli(capsys, "cache")
    assert code == 0 and f"data cache: {cache}" in out and e["key"][:12] in out
    assert "not ftcli's (left alone): my-notes" in out
    code, out, _ = _cli(capsys, "cache", "--clear")
    assert code == 0 and out.startswith("cleared 1 entry (")
    assert "left alone: my-notes" in out
    assert not Path(e["path"]).exists() and (cache / "my-notes" / "a.txt").is_file()
    assert gguf.is_dir()
    code, out, _ = _cli(capsys, "cache", "--json")
    assert json.loads(out)["entries"] == []


@pytest.mark.slow
def test_a_second_train_and_a_second_tune_trial_are_cached(
    tmp_path, tiny_models, tiny_data, cache, capsys
):
    from tests.conftest import run_cli

    m = tiny_recipe(tmp_path, tiny_models, tiny_data, arch="bert")
    m["train"].update(max_steps=2)
    m["merge"] = {"enabled": False}
    path = write_recipe(tmp_path / "r.yaml", **m)
    code, first = run_cli(capsys, "train", str(path))
    assert code == 0 and first["status"] == "completed"
    with pytest.raises(SystemExit) as exc:
        from ftcli.cli import main

        main(["train", str(path), "--set", "name=again"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert re.search(r"^\s+cached [0-9a-f]{12}$", out, re.M), out
    m["name"] = "study"
    m["tune"] = {
        "trials": 2,
        "sampler": "random",
        "metric": "validation_loss",
        "space": {"train.optimizer.lr": {"log_uniform": [1.0e-4, 1.0e-2]}},
    }
    path = write_recipe(tmp_path / "study.yaml", **m)
    with pytest.raises(SystemExit) as exc:
        main(["tune", str(path)])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    notes = re.findall(r"^\s+(cached|prepared) [0-9a-f]{12}", out, re.M)
    # the trials and the final test scoring of the best one all read the same entry
    assert notes and set(notes) == {"cached"}, out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, recipe: Path, tag: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        env.pop(k, None)
    out = tmp_path / tag
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), str(WORKER), str(recipe), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, weightless_model):
    """Two launches of 2 CPU processes on one corpus: the first prepares, the second is cached."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    recipe = _recipe_file(tmp, weightless_model, n=6000, name="ranks")
    old = os.environ.get("FTCLI_CACHE")
    os.environ["FTCLI_CACHE"] = str(tmp / "cache")
    try:
        return _torchrun(tmp, recipe, "first"), _torchrun(tmp, recipe, "second")
    finally:
        if old is None:
            os.environ.pop("FTCLI_CACHE", None)
        else:
            os.environ["FTCLI_CACHE"] = old


@pytest.mark.slow
def test_two_processes_prepare_once_and_the_second_rank_never_tokenizes(two_ranks):
    first, second = two_ranks
    r0, r1 = first
    assert r0["counts"]["write_data"] == 1 and r0["counts"]["tokenizer_calls"] > 0
    assert r1["counts"] == {"write_data": 0, "tokenizer_calls": 0}, r1
    assert r0["note"].startswith("prepared ") and r1["note"] == r0["note"]
    assert r1["examples"] == r0["examples"] and r1["examples"]["train"] > 4000
    assert (r1["first"], r1["last"]) == (r0["first"], r0["last"])
    for r in second:  # a second launch: a hit, nothing prepared anywhere
        assert r["note"].startswith("cached ") and r["counts"]["write_data"] == 0, r
    assert second[1]["counts"]["tokenizer_calls"] == 0
    mib = 2**20
    print(
        f"\nRSS growth over load_data: rank 0 {(r0['rss_after'] - r0['rss_before']) / mib:.1f} "
        f"MiB (prepared), rank 1 {(r1['rss_after'] - r1['rss_before']) / mib:.1f} MiB (opened); "
        f"cached launch: rank 0 {(second[0]['rss_after'] - second[0]['rss_before']) / mib:.1f}, "
        f"rank 1 {(second[1]['rss_after'] - second[1]['rss_before']) / mib:.1f} MiB"
    )


@pytest.mark.slow
@pytest.mark.xfail(
    STAND_IN,
    reason="the list-based stand-in prepared.py (this branch only) decodes every row into "
    "Python lists on read; the bound holds once read_data maps its files (Arrow)",
    strict=True,
)
def test_the_second_rank_adds_under_a_tenth_of_the_first_ranks_data_memory(two_ranks):
    """The memory a rank allocates itself (anonymous resident memory): the second rank's
    against what preparing left in the first. Resident memory also counts the pages of the
    Arrow files a rank maps; those are the page cache's, one copy on the node for every rank
    (at this size about 2.5 MiB, the whole files, on both ranks alike)."""
    (r0, r1), _ = two_ranks
    data = r0["anon_growth"]
    assert data > 8 * 2**20, data  # the corpus is big enough for the bound to mean something
    assert r1["anon_growth"] < 0.1 * data, (r1["anon_growth"], data)
