"""kill -9 at several points of a run (mid-step, mid-checkpoint-write, mid-validation, mid-merge),
then --resume: the final weights, metrics and test scores equal an uninterrupted run's bit for bit
(CPU, one thread on both sides), no half-written checkpoint is ever used, and run.json says what
happened. Each kill lands at its point deterministically: the run is started with a test-only
pause point (``ftcli.testpoints``) and killed while it waits there, as a user's kill could land.
"""

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


def _start(
    recipe: Path, *extra: str, log: Path, pause: str | None = None, marker: Path | None = None
) -> subprocess.Popen:
    """``ftcli train recipe`` in a child process; with ``pause``, it waits at that test point
    (``ftcli.testpoints``) after writing ``marker``."""
    cmd = [sys.executable, "-m", "ftcli", "train", str(recipe), "--json", *extra]
    env = _env()
    if pause:
        env.update(FTCLI_TEST_PAUSE=pause, FTCLI_TEST_PAUSE_FILE=str(marker))
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 (the child owns it)
        cwd=recipe.parent,
    )


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _paused(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 240) -> str:
    """Wait until ``proc`` waits at its pause point; the point's name (as it wrote it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if marker.exists():
            return marker.read_text()
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before its pause point:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run did not reach its pause point")


def same_files(a_dir: Path, b_dir: Path, sub: str) -> None:
    """The safetensors file ``sub`` holds the same tensors, bit for bit, under both folders."""
    a, b = load_file(str(a_dir / sub)), load_file(str(b_dir / sub))
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and (a[k] == b[k]).all())]
    assert not differ, f"{sub}: {differ[:5]} differ"


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


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
    # each run resumes the last one: step 3's row; the step-4 checkpoint (step 2 resumed); the
    # validation at step 6 (step 2 resumed again); the merge (step 4 resumed, trained to the end)
    points = ["step:3", "checkpoint", "validation", "merge"]
    for i, point in enumerate(points):
        log, marker = tmp_path / f"broken-{i}.log", tmp_path / f"pause-{i}"
        proc = _start(recipe, *(["--resume"] if i else []), log=log, pause=point, marker=marker)
        assert _paused(proc, marker, log) == point
        if i == 0:
            # two runs, one folder: while this one holds it, a second refuses in one line
            from ftcli.cli import main

            with pytest.raises(SystemExit) as exc:
                main(["train", str(recipe), "--resume"])
            err = capsys.readouterr().err
            assert exc.value.code == 1
            assert f"is in use by another ftcli train (pid {proc.pid}" in err, err
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rec = json.loads((run_dir / "run.json").read_text())
        assert rec["status"] == "running"  # a killed process cannot write; the reader knows:
        from ftcli.rundir import read_run_record

        assert read_run_record(run_dir).status == "killed"
        if point == "step:3":
            assert [r["step"] for r in _rows(run_dir) if "loss" in r][-1] == 3
        if point == "checkpoint":  # the half-written one is left behind, never used
            assert list((run_dir / "checkpoints").glob(".step-0000004.tmp-*"))
        if point == "validation":
            assert _rows(run_dir)[-1]["step"] == eval_every
            assert not any(r.get("val_loss") is not None for r in _rows(run_dir))
        if point == "merge":
            assert (run_dir / "adapter").exists() and not (run_dir / "merged").exists()
    final = _start(recipe, "--resume", log=tmp_path / "final.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert "took over the lock" in (tmp_path / "final.log").read_text()
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    s_dir = straight_dir / "runs" / "crash"

    for sub in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        same_files(s_dir, run_dir, sub)
    # every loss, lr and val_loss, exactly
    assert without_timing(_rows(run_dir)) == without_timing(_rows(s_dir))
    rs = json.loads((s_dir / "run.json").read_text())
    rb = json.loads((run_dir / "run.json").read_text())
    assert rb["eval"]["metrics"] == rs["eval"]["metrics"]
    assert rb["status"] == "completed" and "error" not in rb
    assert len(rb["resumes"]) == len(points)
    assert all(r["found_status"] == "killed" for r in rb["resumes"])
    assert "resumes" not in rs and rs["effective_batch_size"] == 4
    assert not list(run_dir.rglob(".*.tmp-*")) and not (run_dir.parent / ".crash.lock").exists()
