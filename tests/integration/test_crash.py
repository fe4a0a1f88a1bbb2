"""kill -9 at several points of a run (mid-step, mid-checkpoint-write, mid-validation, mid-merge),
then --resume: the final weights, metrics and test scores equal an uninterrupted run's bit for bit
(CPU, one thread on both sides), no half-written checkpoint is ever used, and run.json says what
happened. The points are observed from outside (a metrics row, a temporary checkpoint folder, a
line on stderr), as a user's kill would land: nothing in ftcli knows it is being tested."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"tokens_per_s", "s_per_step", "elapsed_s"}


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        COLUMNS="120",
    )
    return env


def _start(recipe: Path, *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftcli", "train", str(recipe), "--json", *extra]
    return subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 (the child owns it)
        cwd=recipe.parent,
    )


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _kill_when(proc: subprocess.Popen, seen, timeout: float = 240) -> str | None:
    """SIGKILL ``proc`` the moment ``seen()`` returns a description; None if it ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        what = seen()
        if what:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return what
        if proc.poll() is not None:
            return None
        time.sleep(0.001)
    proc.kill()
    raise AssertionError("the run neither reached the kill point nor ended")


def _mid_step(run_dir: Path):
    def seen():
        steps = [r["step"] for r in _rows(run_dir) if "loss" in r]
        return f"training, after step {steps[-1]}" if steps and steps[-1] >= 3 else None

    return seen


def _mid_checkpoint(run_dir: Path):
    root = run_dir / "checkpoints"
    before = set(root.glob(".step-*.tmp-*"))  # a killed process's leftovers are not this write

    def seen():
        tmp = sorted(set(root.glob(".step-*.tmp-*")) - before) if root.exists() else []
        return f"writing checkpoint {tmp[0].name}" if tmp else None

    return seen


def _mid_validation(run_dir: Path, eval_every: int):
    def seen():
        rows = _rows(run_dir)
        if rows and "loss" in rows[-1] and rows[-1]["step"] % eval_every == 0:
            return f"validating at step {rows[-1]['step']}"
        return None

    return seen


def _mid_merge(log: Path, run_dir: Path):
    def seen():
        if (run_dir / "merged").exists():
            return None
        text = log.read_text() if log.exists() else ""
        return "merging" if "merge    adapter" in text else None

    return seen


def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(
    tmp_path, tiny_models, tiny_data, capsys
):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", kind="lora")
    m["name"] = "crash"
    m["method"]["dropout"] = 0.1  # draws random numbers: resume must restore the RNG exactly
    m["train"].update(
        max_steps=24, batch_size=4, log_every=1, checkpoint_every=2, eval_every=6, seed=3
    )
    m["train"].pop("epochs")
    m["eval"] = {"batch_size": 1}  # a slow validation, so a kill can land inside it
    m["merge"] = {"enabled": True}
    eval_every = 6
    straight_dir = tmp_path / "straight"
    broken_dir = tmp_path / "broken"
    for d in (straight_dir, broken_dir):
        d.mkdir()
        (d / "recipe.yaml").write_text(yaml.safe_dump({**m, "output_dir": str(d / "runs")}))
    straight = _start(straight_dir / "recipe.yaml", log=tmp_path / "straight.log")

    run_dir = broken_dir / "runs" / "crash"
    recipe = broken_dir / "recipe.yaml"
    points = [
        ("mid-step", lambda log: _mid_step(run_dir)),
        ("mid-checkpoint-write", lambda log: _mid_checkpoint(run_dir)),
        ("mid-validation", lambda log: _mid_validation(run_dir, eval_every)),
        ("mid-merge", lambda log: _mid_merge(log, run_dir)),
    ]
    kills = []
    for i, (name, when) in enumerate(points):
        log = tmp_path / f"broken-{i}.log"
        proc = _start(recipe, *(["--resume"] if i else []), log=log)
        if i == 0:
            # two runs, one folder: while this one holds it, a second refuses in one line
            lock = run_dir.parent / ".crash.lock"
            t0 = time.monotonic()
            while not lock.exists() and time.monotonic() - t0 < 120:
                time.sleep(0.01)
            from ftcli.cli import main

            with pytest.raises(SystemExit) as exc:
                main(["train", str(recipe), "--resume"])
            err = capsys.readouterr().err
            assert exc.value.code == 1
            assert f"is in use by another ftcli train (pid {proc.pid}" in err, err
        what = _kill_when(proc, when(log))
        kills.append((name, what))
        if what is None:
            continue  # the run got past this point before it was seen: the next one is tried
        rec = json.loads((run_dir / "run.json").read_text())
        assert rec["status"] == "running"  # a killed process cannot write; the reader knows:
        from ftcli.rundir import read_run_record

        assert read_run_record(run_dir).status == "killed"
        if name == "mid-checkpoint-write":  # the half-written one is left behind, never used
            assert list((run_dir / "checkpoints").glob(".step-*.tmp-*"))
        if name == "mid-validation":
            step = int(what.rsplit(" ", 1)[1])
            assert not any(
                r.get("val_loss") is not None and r["step"] == step for r in _rows(run_dir)
            )
    print("kill points:", kills)
    assert sum(1 for _, w in kills if w) >= 3, kills  # the kills really landed
    final = _start(recipe, "--resume", log=tmp_path / "final.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert "took over the lock" in (tmp_path / "final.log").read_text()
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    s_dir = straight_dir / "runs" / "crash"

    for sub in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(str(s_dir / sub)), load_file(str(run_dir / sub))
        assert a.keys() == b.keys()
        differ = [k for k in a if not (a[k].dtype == b[k].dtype and (a[k] == b[k]).all())]
        assert not differ, f"{sub}: {differ[:5]} differ"

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(_rows(run_dir)) == strip(_rows(s_dir))  # every loss, lr and val_loss, exactly
    rs = json.loads((s_dir / "run.json").read_text())
    rb = json.loads((run_dir / "run.json").read_text())
    assert rb["eval"]["metrics"] == rs["eval"]["metrics"]
    assert rb["status"] == "completed" and "error" not in rb
    landed = [w for _, w in kills if w]
    assert len(rb["resumes"]) == len(landed)
    assert all(r["found_status"] == "killed" for r in rb["resumes"])
    assert "resumes" not in rs and rs["effective_batch_size"] == 4
    assert not list(run_dir.rglob(".*.tmp-*")) and not (run_dir.parent / ".crash.lock").exists()
