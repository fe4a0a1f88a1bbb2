"""Atomic writes hold on a real full disk and across a crash at any step: the libraries' own
full-disk errors are recognised, the message names the file, the previous version stays whole,
a replaced folder is never missing, and renames are flushed to disk (the parent folder fsynced).
The full disk is a real tmpfs of a few hundred KiB (root only; skipped, saying why, elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ftcli.util as util
from ftcli.errors import FtcliError
from tests.tmpfs import fill, small_tmpfs

ROOT = Path(__file__).resolve().parents[2]
BIG = {"w": torch.arange(65536, dtype=torch.float32)}  # 256 KiB: more than is left


def _tokenizer():
    """A real tokenizer whose tokenizer.json is a few hundred KiB."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"word{i}": i for i in range(20000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="word0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _write_text(p: Path) -> None:
    p.write_text("x" * 300_000)


WRITERS = {
    "safetensors": lambda p: save_file(BIG, str(p)),
    "torch.save": lambda p: torch.save(BIG, p),
    "tokenizers": lambda p: _tokenizer().save(str(p)),
    "write_text": _write_text,
}


@pytest.fixture
def fs(tmp_path):
    with small_tmpfs(tmp_path / "fs", "400k") as where:
        yield where


def _names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- what a full disk raises


def test_the_libraries_full_disk_errors_are_recognised(fs, tmp_path):
    fill(fs)
    caught = {}
    for name, write in WRITERS.items():
        with pytest.raises(Exception) as exc:  # noqa: PT011 (each library raises its own)
            write(fs / name)
        caught[name] = exc.value
        assert util.is_disk_full(exc.value, fs / name), f"{name}: {exc.value!r}"
    # torch.save's "unexpected pos" carries no errno nor text: a full disk only when it is one
    assert "unexpected pos" in str(caught["torch.save"])
    assert not util.is_disk_full(caught["torch.save"])
    assert not util.is_disk_full(caught["torch.save"], tmp_path)  # a disk with room
    assert not util.is_disk_full(RuntimeError("unexpected pos 64 vs 0"), tmp_path)
    assert not util.is_disk_full(FtcliError("No space left on device, says the user"))


def test_every_way_torch_save_fails_on_a_full_disk_is_recognised(fs, tmp_path):
    """torch.save says "unexpected pos" or "basic_ios::clear: iostream error" depending on which
    write the space ran out in: a sweep of sizes meets both."""
    fill(fs, leave=4096)
    said = set()
    for n in range(600, 1100, 8):
        try:
            torch.save({"w": torch.zeros(n)}, fs / "x.pt")
        except RuntimeError as exc:
            said.add("unexpected pos" if "unexpected pos" in str(exc) else str(exc))
            assert util.is_disk_full(exc, fs / "x.pt"), repr(exc)
            assert not util.is_disk_full(exc, tmp_path)
        (fs / "x.pt").unlink(missing_ok=True)
    assert said == {"unexpected pos", "basic_ios::clear: iostream error"}


# --------------------------------------------------------------------------- atomic files and folders


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_file_written_into_a_full_disk_is_named_and_the_previous_one_kept(fs, writer):
    path = fs / "out.bin"
    path.write_bytes(b"the previous version")
    fill(fs, leave=8192)
    with pytest.raises(FtcliError) as exc, util.atomic_file(path) as tmp:
        WRITERS[writer](tmp)
    assert exc.value.message.startswith(f"the disk is full: {path} was not written")
    assert path.read_bytes() == b"the previous version"
    assert _names(fs) == ["ballast", "out.bin"]  # no temporary file left


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_folder_written_into_a_full_disk_names_the_file_and_keeps_the_previous_one(fs, writer):
    target = fs / "ckpt"
    target.mkdir()
    (target / "state.json").write_text('{"step": 2}')
    fill(fs, leave=8192)
    with pytest.raises(FtcliError) as exc, util.atomic_dir(target) as tmp:
        (tmp / "small.json").write_text("{}")
        WRITERS[writer](tmp / "big.bin")
    msg = exc.value.render()
    assert msg.startswith(
        f"the disk is full: {target / 'big.bin'} could not be written, so {target} was not saved"
    )
    assert "df -h" in msg and ".tmp" not in msg
    assert _names(target) == ["state.json"] and _names(fs) == ["ballast", "ckpt", "ckpt/state.json"]


def test_a_tokenizer_saved_into_a_full_disk_names_its_file(fs):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), unk_token="word0")
    target = fs / "adapter"
    fill(fs, leave=16384)
    with pytest.raises(FtcliError) as exc, util.atomic_dir(target) as tmp:
        tok.save_pretrained(tmp)
    assert exc.value.message.startswith(f"the disk is full: {target / 'tokenizer.json'} could not")
    assert _names(fs) == ["ballast"]


def test_a_record_written_into_a_full_disk_is_named_and_the_previous_one_kept(fs):
    path = fs / "run.json"
    util.write_json(path, {"status": "old"})
    fill(fs, leave=0)
    with pytest.raises(FtcliError, match=f"^the disk is full: {path} was not written"):
        util.write_json(path, {"status": "new", "pad": "x" * 10000})
    assert json.loads(path.read_text()) == {"status": "old"}
    assert _names(fs) == ["ballast", "run.json"]


def test_a_json_record_inside_a_folder_is_named_by_its_final_path(fs):
    target = fs / "step-0000004"
    fill(fs, leave=0)
    with pytest.raises(FtcliError) as exc, util.atomic_dir(target) as tmp:
        util.write_json(tmp / "state.json", {"x": "y" * 10000})
    assert exc.value.message.startswith(f"the disk is full: {target / 'state.json'} could not")


# --------------------------------------------------------------------------- replacing a folder

CRASH = """
import os, shutil, sys
from pathlib import Path
import ftcli.util as u

target, k = Path(sys.argv[1]), int(sys.argv[2])
calls = 0


def dies_at_k(fn):
    def step(*a, **kw):
        global calls
        if calls == k:
            os._exit(9)  # a crash: no cleanup runs
        calls += 1
        return fn(*a, **kw)

    return step


for mod, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"),
                  (u, "exchange"), (u, "fsync_dir")]:
    if hasattr(mod, name):
        setattr(mod, name, dies_at_k(getattr(mod, name)))
with u.atomic_dir(target) as tmp:
    for i in range(3):
        (tmp / f"part-{i}").write_text(f"new {i}")
"""

OLD = {f"part-{i}": f"old {i}" for i in range(3)}
NEW = {f"part-{i}": f"new {i}" for i in range(3)}


def _contents(folder: Path) -> dict | None:
    if not folder.is_dir():
        return None
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_crash_at_any_step_of_a_replace_leaves_the_old_or_the_new_folder_whole(tmp_path):
    target = tmp_path / "best"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = []
    for k in range(200):
        shutil.rmtree(tmp_path, ignore_errors=True)
        target.mkdir(parents=True)
        for name, text in OLD.items():
            (target / name).write_text(text)
        r = subprocess.run([sys.executable, "-c", CRASH, str(target), str(k)], env=env)
        got = _contents(target)
        assert got in (OLD, NEW), f"killed before step {k}: {target} holds {got}"
        seen.append("new" if got == NEW else "old")
        if r.returncode == 0:  # no step left to crash at
            break
        assert r.returncode == 9
    assert seen[0] == "old" and seen[-1] == "new" and len(seen) > 3


def _recording_fsync(monkeypatch) -> list[tuple[str, bool]]:
    """Record the path each fsync'd descriptor points at."""
    real, seen = os.fsync, []

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name descriptors")
def test_renames_into_place_are_flushed_to_disk(tmp_path, monkeypatch):
    seen = _recording_fsync(monkeypatch)
    target = tmp_path / "out" / "adapter"
    with util.atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert str(target.parent) in seen  # the rename itself
    assert seen.index(str(target.parent)) > max(
        i for i, p in enumerate(seen) if p.endswith("w.bin")
    )
    assert any(p.endswith("/sub") for p in seen)  # the names inside the new folder
    seen.clear()
    util.atomic_write_text(tmp_path / "run.json", "{}")
    assert seen[-1] == str(tmp_path) and seen[0].endswith(".tmp")  # the file, then the rename


def test_an_existing_folder_is_swapped_in_one_step_where_the_os_can(tmp_path, monkeypatch):
    target = tmp_path / "best"
    target.mkdir()
    (target / "w").write_text("old")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a) or real_rename(*a))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    if not util.exchange(a, b):
        pytest.skip("this OS or filesystem has no RENAME_EXCHANGE (two renames are used)")
    a.rmdir(), b.rmdir()
    with util.atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert renames == [] and (target / "w").read_text() == "new"
    assert _names(tmp_path) == ["best", "best/w"]


def test_without_an_exchange_a_crash_between_the_two_renames_is_put_back(tmp_path, monkeypatch):
    monkeypatch.setattr(util, "exchange", lambda a, b: False)  # as on an OS without one
    target = tmp_path / "best"
    target.mkdir()
    (target / "w").write_text("old")
    with util.atomic_dir(target) as tmp:  # the two renames work
        (tmp / "w").write_text("new")
    assert _contents(target) == {"w": "new"} and _names(tmp_path) == ["best", "best/w"]

    class Crash(BaseException):
        pass

    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise Crash
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash), util.atomic_dir(target) as tmp:
        (tmp / "w").write_text("newer")
    monkeypatch.setattr(os, "rename", real)
    assert not target.exists()  # the crash landed between the renames
    assert util.restore_replaced(tmp_path) == [target]
    assert _contents(target) == {"w": "new"} and _names(tmp_path) == ["best", "best/w"]
    assert util.restore_replaced(tmp_path) == []


# --------------------------------------------------------------------------- sharded checkpoints


def _ranks_write(tmp: Path) -> None:
    for rank in range(2):
        (tmp / "pytorch_model_fsdp_0").mkdir(parents=True, exist_ok=True)
        (tmp / "pytorch_model_fsdp_0" / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 1000)
        (tmp / f"random_states_{rank}.pkl").write_bytes(b"rng")


def test_a_sharded_checkpoint_is_sealed_with_the_hash_of_every_shard(tmp_path):
    target = tmp_path / "checkpoints" / "step-0000004"
    tmp = util.shards_dir(target)
    assert tmp.parent == target.parent and tmp.name.startswith(".step-0000004.tmp-")
    tmp.mkdir(parents=True)
    _ranks_write(tmp)
    sched = {"last_epoch": 4}
    sealed = util.seal_dir(
        tmp, target, "state.json", {"global_step": 4}, write=lambda d: torch.save(sched, d / "s.pt")
    )
    assert sealed == target and torch.load(target / "s.pt") == sched
    state = json.loads((target / "state.json").read_text())
    assert state["global_step"] == 4
    assert sorted(state["sha256"]) == [
        "pytorch_model_fsdp_0/__0_0.distcp",
        "pytorch_model_fsdp_0/__1_0.distcp",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "s.pt",
    ]
    util.check_hashes(target, state["sha256"], "checkpoint")
    assert _names(target.parent)[0] == "step-0000004"  # the temporary folder is gone
    shard = target / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])  # truncated
    with pytest.raises(FtcliError, match=f"{shard} does not match the sha256"):
        util.check_hashes(target, state["sha256"], "checkpoint")


def test_sealing_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    target = tmp_path / "step-0000004"
    target.mkdir()
    (target / "stale.bin").write_text("from a run that stopped")
    tmp = util.shards_dir(target)
    tmp.mkdir()
    _ranks_write(tmp)
    util.seal_dir(tmp, target, "state.json", {"global_step": 4})
    assert not (target / "stale.bin").exists() and (target / "state.json").exists()
    assert _names(tmp_path)[0] == "step-0000004" and not tmp.exists()


def test_sealing_on_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(fs):
    target = fs / "step-0000004"
    target.mkdir()
    (target / "state.json").write_text('{"global_step": 4}')
    tmp = util.shards_dir(target)
    tmp.mkdir()
    _ranks_write(tmp)
    fill(fs)
    with pytest.raises(FtcliError) as exc:
        util.seal_dir(tmp, target, "state.json", {"global_step": 4, "pad": "x" * 10000})
    assert exc.value.message.startswith(
        f"the disk is full: {target / 'state.json'} could not be written, so {target} was not saved"
    )
    assert not tmp.exists() and _contents(target) == {"state.json": '{"global_step": 4}'}
    tmp.mkdir()
    _ranks_write(tmp)
    with pytest.raises(FtcliError) as exc:  # the main process's own file (the scheduler's)
        util.seal_dir(tmp, target, "state.json", {}, write=lambda d: torch.save(BIG, d / "s.pt"))
    assert exc.value.message.startswith(f"the disk is full: {target / 's.pt'} could not be")
    assert not tmp.exists() and _contents(target) == {"state.json": '{"global_step": 4}'}
