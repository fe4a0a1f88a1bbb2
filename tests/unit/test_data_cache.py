"""The data cache (ftcli/data/store.py): a hit reuses the entry without preparing, each changed
input misses and says which, a damaged entry is rebuilt with the reason, a full disk leaves no
entry, concurrent builders build once, only ftcli's folders are listed and cleared, and a
process that is not its node's main never prepares.

The tests depend only on write_data/read_data's contract, never on the files they write."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

import ftcli.data.prepared as prepared_mod
from ftcli.data import store
from ftcli.errors import DataError, FtcliError
from ftcli.recipe import recipe_from_mapping
from ftcli.util import DiskFull
from tests.conftest import _train_tokenizer, chat_rows
from tests.tmpfs import fill, small_tmpfs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    _train_tokenizer("bpe", folder)
    return folder


def _tokenizer(folder: Path):
    from ftcli.models import tokenizer_from

    return tokenizer_from(folder)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FTCLI_CACHE", str(root))
    return root / "data"


@pytest.fixture
def builds(monkeypatch) -> list:
    """Each write_data call, counted (the cache must not call it on a hit)."""
    calls: list = []
    real = prepared_mod.write_data

    def counting(recipe, tokenizer, folder, ui=None):
        calls.append(Path(folder))
        return real(recipe, tokenizer, folder, ui)

    monkeypatch.setattr(prepared_mod, "write_data", counting)
    return calls


def _data(path: Path, n: int = 60, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed)))
    return path


def _recipe(data: Path, tok_dir: Path, **data_keys):
    return recipe_from_mapping(
        {
            "name": "cached",
            "task": "causal_lm",
            "model": {"name": str(tok_dir)},
            "data": {
                "path": str(data),
                "messages_column": "messages",
                "split": {"validation": 0.1, "test": 0.2, "seed": 0},
                "max_length": 64,
                **data_keys,
            },
            "method": {"kind": "lora", "r": 4, "alpha": 8},
            "train": {"epochs": 1, "batch_size": 4},
        }
    )


def _load(recipe, tok_dir, **kw):
    return store.load_data(recipe, _tokenizer(tok_dir), str(tok_dir), **kw)


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if store.KEY_RE.match(p.name)] if cache.exists() else []


def _features(tokenized) -> dict:
    return {s: [f["input_ids"] for f in t.features] for s, t in tokenized.items()}


def test_a_second_load_is_a_hit_and_prepares_nothing(tmp_path, tok_dir, cache, builds):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    p1, t1, note1 = _load(r, tok_dir)
    assert note1.startswith("prepared ") and "no entry for key" in note1
    assert len(builds) == 1
    p2, t2, note2 = _load(r, tok_dir)
    assert note2.startswith("cached ") and len(builds) == 1  # write_data not called again
    (entry,) = _entries(cache)
    assert note2 == f"cached {entry.name[:12]}" and note1.startswith(f"prepared {entry.name[:12]}")
    assert _features(t1) == _features(t2)
    assert [len(p2.splits[s]) for s in ("train", "validation", "test")] == [
        len(p1.splits[s]) for s in ("train", "validation", "test")
    ]
    assert p2.stats["source"] == str(tmp_path / "d.jsonl")


def test_a_moved_source_file_still_hits_and_the_run_names_its_own_path(
    tmp_path, tok_dir, cache, builds
):
    _load(_recipe(_data(tmp_path / "d.jsonl"), tok_dir), tok_dir)
    moved = tmp_path / "elsewhere" / "same.jsonl"
    moved.parent.mkdir()
    os.rename(tmp_path / "d.jsonl", moved)
    prepared, _, note = _load(_recipe(moved, tok_dir), tok_dir)
    assert note.startswith("cached ") and len(builds) == 1
    assert prepared.stats["source"] == str(moved)


def test_a_same_size_change_of_the_source_misses_and_says_so(tmp_path, tok_dir, cache, builds):
    data = _data(tmp_path / "d.jsonl")
    r = _recipe(data, tok_dir)
    _load(r, tok_dir)
    text = data.read_text()
    changed = text.replace("plus", "PLUS", 1)
    assert len(changed) == len(text)
    data.write_text(changed)
    _, tokenized, note = _load(r, tok_dir)
    assert note.endswith(": source data.path changed"), note
    assert len(builds) == 2 and len(_entries(cache)) == 2


def test_an_unchanged_file_is_not_read_again_but_a_touched_one_is(
    tmp_path, tok_dir, cache, builds, monkeypatch
):
    data = _data(tmp_path / "d.jsonl")
    old = time.time() - 3600
    os.utime(data, (old, old))  # settled: older than the index's racy window
    r = _recipe(data, tok_dir)
    _load(r, tok_dir)
    read: list[str] = []
    real = store.xxh_file
    monkeypatch.setattr(store, "xxh_file", lambda p: read.append(str(p)) or real(p))
    assert _load(r, tok_dir)[2].startswith("cached ")
    assert str(data) not in read  # the index answered for the unchanged file
    os.utime(data, (old + 1, old + 1))  # same bytes, new mtime: hashed again, still a hit
    assert _load(r, tok_dir)[2].startswith("cached ")
    assert str(data) in read and len(builds) == 1


def test_a_changed_tokenizer_file_misses(tmp_path, tok_dir, cache, builds):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in tok_dir.iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    r = _recipe(_data(tmp_path / "d.jsonl"), tok)
    _load(r, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345  # a different tokenizer file, same vocabulary
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    note = _load(r, tok)[2]
    assert note.endswith(": tokenizer changed"), note
    assert len(builds) == 2


def test_a_hit_is_told_without_the_tokenizer_and_any_change_falls_back(
    tmp_path, tok_dir, cache, builds, monkeypatch
):
    """``load_cached`` (a cached ``ftcli prepare``) answers from the light key alone; a changed
    source, tokenizer file, data key or model key is not a hit there (``load_data`` says why)."""
    import ftcli.models

    tok = tmp_path / "tok"
    tok.mkdir()
    for f in tok_dir.iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    (tok / "config.json").write_text(json.dumps({"model_type": "llama"}))
    data = _data(tmp_path / "d.jsonl")
    r = _recipe(data, tok)
    assert store.load_cached(r) is None  # nothing cached yet
    _, t1, note = _load(r, tok)
    loads: list = []
    monkeypatch.setattr(ftcli.models, "tokenizer_from", lambda *a, **k: loads.append(a))
    prepared, t2, hit = store.load_cached(r)
    assert hit == "cached " + note.split()[1].rstrip(":") and _features(t2) == _features(t1)
    assert prepared.stats["source"] == str(data) and not loads and len(builds) == 1
    assert store.load_cached(_recipe(data, tok, max_length=32)) is None
    other = r.model_copy(update={"model": r.model.model_copy(update={"revision": "v2"})})
    assert store.load_cached(other) is None
    raw = (tok / "tokenizer_config.json").read_bytes()
    cfg = json.loads(raw)
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    assert store.load_cached(r) is None
    (tok / "tokenizer_config.json").write_bytes(raw)
    assert store.load_cached(r) is not None  # the same bytes again: the same light key
    data.write_text(data.read_text().replace("plus", "PLUS", 1))
    assert store.load_cached(r) is None
    shutil.rmtree(_entries(cache)[0])
    data.write_text(data.read_text().replace("PLUS", "plus", 1))
    assert store.load_cached(r) is None  # its entry is gone


def test_a_changed_data_key_misses_and_a_batching_key_does_not(tmp_path, tok_dir, cache, builds):
    data = _data(tmp_path / "d.jsonl")
    _load(_recipe(data, tok_dir), tok_dir)
    note = _load(_recipe(data, tok_dir, max_length=32), tok_dir)[2]
    assert note.endswith(": recipe data section changed"), note
    note = _load(_recipe(data, tok_dir, max_length=32, packing=False), tok_dir)[2]
    assert note.startswith("cached "), note  # packing changes batches, not the prepared data
    assert len(builds) == 2


def test_a_new_format_version_misses(tmp_path, tok_dir, cache, builds, monkeypatch):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    _load(r, tok_dir)
    monkeypatch.setattr(store, "FORMAT_VERSION", store.FORMAT_VERSION + 1)
    note = _load(r, tok_dir)[2]
    assert note.endswith(": format version changed"), note
    assert len(builds) == 2


def _largest_file(entry: Path) -> Path:
    files = [p for p in (entry / store.DATA).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("how", ["truncate", "no-manifest", "unreadable"])
def test_a_damaged_entry_is_removed_and_rebuilt_with_the_reason(
    tmp_path, tok_dir, cache, builds, monkeypatch, how
):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    _, t1, _ = _load(r, tok_dir)
    before = _features(t1)  # read now: the damage below truncates the file t1 maps (SIGBUS)
    (entry,) = _entries(cache)
    if how == "truncate":
        victim = _largest_file(entry)
        os.truncate(victim, victim.stat().st_size // 2)
        why = f"{victim.relative_to(entry).as_posix()} is "
    elif how == "no-manifest":
        (entry / store.MANIFEST).unlink()
        why = "its manifest is missing"
    else:  # the manifest agrees, but read_data refuses it
        real = prepared_mod.read_data
        failed: list = []

        def refuse_once(folder):
            if not failed:
                failed.append(folder)
                raise DataError(f"{folder}: a table is unreadable")
            return real(folder)

        monkeypatch.setattr(prepared_mod, "read_data", refuse_once)
        why = "it cannot be read (" + str(entry / store.DATA) + ": a table is unreadable)"
    _, t2, note = _load(r, tok_dir)
    assert note.startswith(f"prepared {entry.name[:12]}: entry {entry.name[:12]} was damaged (")
    assert why in note and note.endswith("): removed, prepared again"), note
    assert len(builds) == 2 and store.damage(entry) is None
    assert before == _features(t2)
    assert _load(r, tok_dir)[2].startswith("cached ")


def test_a_full_disk_while_caching_leaves_no_entry_and_one_message(
    tmp_path, tok_dir, monkeypatch, builds
):
    with small_tmpfs(tmp_path / "fs", "256k") as fs:
        monkeypatch.setenv("FTCLI_CACHE", str(fs / "cache"))
        (fs / "cache" / "data").mkdir(parents=True)
        fill(fs, leave=16 * 1024)
        r = _recipe(_data(tmp_path / "d.jsonl", n=200), tok_dir)
        with pytest.raises(DiskFull) as exc:
            _load(r, tok_dir)
        text = exc.value.render()
        assert text.startswith("the disk is full: the data cache entry ")
        assert "nothing half-written is left" in text and "ftcli cache --clear" in text
        left = sorted(p.name for p in (fs / "cache" / "data").iterdir())
        assert not [n for n in left if store.KEY_RE.match(n) or ".tmp-" in n], left
        (fs / "ballast").unlink()
        assert _load(r, tok_dir)[2].startswith("prepared ")  # room again: it builds


def test_concurrent_builders_of_one_key_build_once(tmp_path, tok_dir, cache, monkeypatch):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    real = prepared_mod.write_data
    calls: list = []

    def slow(recipe, tokenizer, folder, ui=None):
        calls.append(folder)
        time.sleep(0.5)  # the second builder arrives while the first still writes
        return real(recipe, tokenizer, folder, ui)

    monkeypatch.setattr(prepared_mod, "write_data", slow)
    notes: list = []
    errors: list = []

    def run():
        try:
            notes.append(_load(r, tok_dir)[2])
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(calls) == 1, (errors, calls)
    assert sorted(n.split()[0] for n in notes) == ["cached", "prepared"]


def test_cache_lists_and_clears_only_its_own_entries(tmp_path, tok_dir, cache, builds):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    _load(r, tok_dir)
    (entry,) = _entries(cache)
    mine_looking = cache / ("a" * 64)  # a key's name, but not made by ftcli
    mine_looking.mkdir()
    (mine_looking / "keep.txt").write_text("a user's file")
    (cache / "notes").mkdir()
    entries, others = store.list_entries(cache)
    assert [e["key"] for e in entries] == [entry.name]
    assert entries[0]["source"] == str(tmp_path / "d.jsonl") and entries[0]["size"] > 0
    assert sorted(others) == sorted(["a" * 64, "notes"])
    removed, freed, kept = store.clear(cache)
    assert removed == 1 and freed == entries[0]["size"] and sorted(kept) == sorted(others)
    assert not entry.exists() and (mine_looking / "keep.txt").is_file()
    assert (cache / "notes").is_dir()
    assert _load(r, tok_dir)[2].startswith("prepared ") and len(builds) == 2


def test_a_process_that_is_not_its_nodes_main_never_prepares(
    tmp_path, tok_dir, cache, builds, monkeypatch
):
    r = _recipe(_data(tmp_path / "d.jsonl"), tok_dir)
    entry_path, *_ = store.ensure(r, _tokenizer(tok_dir), str(tok_dir))
    assert len(builds) == 1

    class Rank1:
        num_processes, process_index, local_process_index = 2, 1, 1
        is_local_main_process = False

    told = ("ok", str(entry_path), f"prepared {entry_path.name[:12]}: no entry")
    monkeypatch.setattr(store, "_gather", lambda mine, world: [told, mine])
    monkeypatch.setattr(store, "ensure", lambda *a, **k: pytest.fail("rank 1 looked up the key"))
    prepared, tokenized, note = _load(r, tok_dir, acc=Rank1())
    assert note == told[2] and len(builds) == 1 and len(tokenized["train"].features) > 0
    # the main process failed: every rank gets its message, none prepares
    monkeypatch.setattr(
        store, "_gather", lambda mine, world: [("error", "bad data", "fix it"), mine]
    )
    with pytest.raises(FtcliError, match="bad data"):
        _load(r, tok_dir, acc=Rank1())
    assert len(builds) == 1
