"""A real Ctrl-C (SIGINT to a running ``ftcli train``) mid-step, mid-checkpoint-write and
mid-validation: each exits 130 with "interrupted at step N; checkpoint saved", run.json says
``interrupted``, and ``--resume`` finishes with an uninterrupted run's adapter weights, bit for bit
(CPU, one thread on both sides). Each signal lands at a test-only pause point, as in test_crash."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from ftcli.rundir import read_run_record
from tests.conftest import tiny_recipe
from tests.integration.test_crash import _paused, _rows, _start, same_files, without_timing

pytestmark = pytest.mark.slow


def test_ctrl_c_anywhere_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(
    tmp_path, tiny_models, tiny_data
):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", kind="lora")
    m["name"] = "ctrlc"
    m["method"]["dropout"] = 0.1  # draws random numbers: the saved RNG state must be the right one
    m["train"].update(
        max_steps=12, batch_size=4, log_every=1, checkpoint_every=2, eval_every=6, seed=3
    )
    m["train"].pop("epochs")
    m["merge"] = {"enabled": False}
    straight_dir, broken_dir = tmp_path / "straight", tmp_path / "broken"
    for d in (straight_dir, broken_dir):
        d.mkdir()
        (d / "recipe.yaml").write_text(yaml.safe_dump({**m, "output_dir": str(d / "runs")}))
    straight = _start(straight_dir / "recipe.yaml", log=tmp_path / "straight.log")

    run_dir = broken_dir / "runs" / "ctrlc"
    recipe = broken_dir / "recipe.yaml"
    # (pause point, the step the interrupted run stops at): after step 3's row; in the step-4
    # checkpoint's write (its temporary folder made); in the validation after step 6
    points = [("step:3", 3), ("checkpoint", 4), ("validation", 6)]
    for i, (point, step) in enumerate(points):
        log, marker = tmp_path / f"broken-{i}.log", tmp_path / f"pause-{i}"
        proc = _start(recipe, *(["--resume"] if i else []), log=log, pause=point, marker=marker)
        assert _paused(proc, marker, log) == point
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        err = log.read_text()
        assert f"interrupted at step {step}; checkpoint saved" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
        assert read_run_record(run_dir).status == "interrupted"
        ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
        assert (ckpt / "state.json").exists(), sorted(p.name for p in ckpt.parent.iterdir())
        assert json.loads((ckpt / "state.json").read_text())["global_step"] == step
        assert not list(run_dir.rglob(".*.tmp-*"))  # the interrupted write cleaned up after itself
        assert [r["step"] for r in _rows(run_dir) if "loss" in r][-1] == step
    final = _start(recipe, "--resume", log=tmp_path / "final.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    s_dir = straight_dir / "runs" / "ctrlc"

    same_files(s_dir, run_dir, "adapter/adapter_model.safetensors")
    # the training rows only: the validation a Ctrl-C cut short (step 6) is not redone by --resume
    # (the checkpoint saved at the interrupt is past it), so its val_loss row is missing
    train_rows = [r for r in without_timing(_rows(run_dir)) if "loss" in r]
    assert train_rows == [r for r in without_timing(_rows(s_dir)) if "loss" in r]
    rb = json.loads((run_dir / "run.json").read_text())
    assert rb["status"] == "completed" and "error" not in rb
    assert [r["found_status"] for r in rb["resumes"]] == ["interrupted"] * len(points)
