"""Nothing lost, nothing silent: an unwritable output folder, a run folder in use, a loss that goes
NaN or spikes, a damaged checkpoint or adapter: one message each, nothing half-written, the last
good state kept. (A real full disk: test_durability.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ftcli.errors import FtcliError
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import tiny_recipe, trained_run, write_recipe


def _recipe(tmp_path, tiny_models, tiny_data, **train):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", kind="lora")
    m["train"].update({"max_steps": 6, "checkpoint_every": 2, "log_every": 1, **train})
    m["train"].pop("epochs")
    m["merge"] = {"enabled": False}
    return m


def _cli(capsys, *args):
    from ftcli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["/proc/ftcli-cannot-write-here", "FILE/sub"])
def test_an_unwritable_output_dir_fails_before_anything_loads(
    tmp_path, tiny_models, tiny_data, capsys, monkeypatch, where
):
    import ftcli.pipeline

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(ftcli.pipeline, "recipe_tokenizer", must_not_load)
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    m = _recipe(tmp_path, tiny_models, tiny_data)
    m["output_dir"] = out
    code, err = _cli(capsys, "train", str(write_recipe(tmp_path / "r.yaml", **m)))
    assert code == 1 and "Traceback" not in err
    (line, hint) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith(f"error: cannot write the output folder {out}: ")
    assert "output_dir" in hint


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    from ftcli.runlock import acquire, lock_path, release

    run_dir = tmp_path / "runs" / "x"
    run_dir.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    lock_path(run_dir).write_text(json.dumps({"pid": dead.pid, "host": host, "since": "then"}))
    held = acquire(run_dir)
    assert held.took_over == f"pid {dead.pid} on {host}, since then"
    assert json.loads(lock_path(run_dir).read_text())["pid"] == os.getpid()
    release(held)
    assert not lock_path(run_dir).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(run_dir).write_text(json.dumps({"pid": alive.pid, "host": host, "since": "now"}))
        with pytest.raises(FtcliError, match=rf"in use by another ftcli train \(pid {alive.pid} "):
            acquire(run_dir)
    finally:
        alive.kill()
        alive.wait()
    lock_path(run_dir).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now"}))
    with pytest.raises(FtcliError, match="on elsewhere"):  # cannot tell: it refuses, never steals
        acquire(run_dir)


def _finite(ckpt) -> bool:
    return all(
        torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values()
    )


@pytest.mark.slow
def test_a_loss_that_goes_inf_or_nan_stops_at_once_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_models, tiny_data, capsys
):
    # sgd at 1e38 with clipping: step 1 moves weights by up to 1e38 (finite), step 2 overflows
    m = _recipe(
        tmp_path,
        tiny_models,
        tiny_data,
        checkpoint_every=1,
        max_grad_norm=1.0,
        optimizer={"name": "sgd", "lr": 1.0e38},
    )
    code, err = _cli(capsys, "train", str(write_recipe(tmp_path / "r.yaml", **m)))
    assert code == 1 and "Traceback" not in err
    msg = err[err.index("error:") :]
    assert "training stopped at step " in msg
    assert any(x in msg for x in ("the loss is nan", "the loss is inf", "not finite"))
    assert "train.optimizer.lr: 1e+38" in msg and "fp16" in msg and "data row" in msg
    run_dir = tmp_path / "runs" / m["name"]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert ckpts and all(_finite(c) for c in ckpts)  # never a NaN/Inf weight written
    assert f"the last good checkpoint is {ckpts[-1]}" in msg
    assert not (run_dir / "adapter").exists()
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and rec["error"].startswith("training stopped at step")


@pytest.mark.slow
def test_max_loss_spike_stops_training_naming_the_rows(tmp_path, tiny_models, tiny_data):
    # a learning rate far too high: the loss jumps well over the lowest one after the first
    # steps (at the conftest's rate, micro-batch losses near ln 2 only sometimes differ by 1%)
    optimizer = {"name": "adamw", "lr": 0.5}
    m = _recipe(
        tmp_path, tiny_models, tiny_data, max_loss_spike=1.01, batch_size=4, optimizer=optimizer
    )
    with pytest.raises(FtcliError) as exc:
        train_run(recipe_from_mapping(m), UI())
    msg = exc.value.render()
    assert "over train.max_loss_spike (1.01) times the lowest so far" in msg
    assert "/data/train.jsonl)" in msg and "lines " in msg


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_not_loaded(tmp_path, tiny_models, tiny_data):
    r = recipe_from_mapping(_recipe(tmp_path, tiny_models, tiny_data))
    train_run(r, UI())
    (ckpt,) = (r.run_dir / "checkpoints").glob("step-*")
    target = ckpt / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:-64])
    with pytest.raises(FtcliError) as exc:
        train_run(r, UI(), resume=True)
    msg = exc.value.render()
    assert f"checkpoint {ckpt} is damaged: {target} does not match the sha256" in msg


@pytest.mark.slow
def test_a_truncated_adapter_is_named_not_loaded(tmp_path_factory, tiny_models, tiny_data, capsys):
    src = trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora")
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(src, run)
    rec = json.loads((run / "adapter" / "ftcli.json").read_text())
    assert set(rec["sha256"]) == {"adapter_model.safetensors"}
    target = run / "adapter" / "adapter_model.safetensors"
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    code, err = _cli(capsys, "eval", str(run))
    assert code == 1 and "Traceback" not in err
    assert f"{target} does not match the sha256 recorded" in err


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
    from ftcli.util import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(path, partial_tail=True) == [{"step": 1}]
    with pytest.raises(json.JSONDecodeError):  # elsewhere a damaged line is not hidden
        read_jsonl(path)
    path.write_text('{"step": 1}\n')
    assert read_jsonl(path, partial_tail=True) == [{"step": 1}]
