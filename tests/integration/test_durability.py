"""A real full disk under a real run: `ftcli train` into a tmpfs of a few hundred KiB ends in one
message naming the file that did not fit (exit 1, no traceback), leaves nothing half-written,
and a disk that fills mid-run keeps the previous checkpoint, from which --resume goes on. The
tmpfs is mounted for the test (root only; skipped, saying why, where it cannot be)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftcli.errors import FtcliError
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from ftcli.util import check_hashes, read_json
from tests.conftest import tiny_recipe, write_recipe
from tests.tmpfs import fill, small_tmpfs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, tiny_models, tiny_data, out: Path, **train) -> dict:
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", kind="lora")
    m["train"].pop("epochs")
    m["train"].update(train)
    m["merge"] = {"enabled": False}
    m["output_dir"] = str(out)
    return m


def _nothing_half_written(fs: Path) -> None:
    """No temporary or set-aside name left; every record parses; every checkpoint is whole."""
    hidden = [p for p in fs.rglob(".*")]
    assert not hidden, f"left behind: {hidden}"
    for p in fs.rglob("*.json"):
        read_json(p)
    for ckpt in fs.rglob("checkpoints/step-*"):
        state = read_json(ckpt / "state.json")
        check_hashes(ckpt, state["sha256"], "checkpoint")


# free space left on the 400 KiB tmpfs: with the tiny run here each runs out in a different
# writer (a checkpoint's safetensors, its torch.save'd optimizer, the adapter's safetensors)
@pytest.mark.parametrize("leave_kib", [52, 64, 100])
def test_train_into_a_full_disk_ends_in_one_message_naming_the_file(
    tmp_path, tiny_models, tiny_data, leave_kib
):
    with small_tmpfs(tmp_path / "fs", "400k") as fs:
        m = _recipe(tmp_path, tiny_models, tiny_data, fs / "runs", max_steps=2, checkpoint_every=1)
        recipe = write_recipe(tmp_path / "r.yaml", **m)
        run_dir = fs / "runs" / m["name"]
        fill(fs, leave=leave_kib * 1024)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(
            [sys.executable, "-m", "ftcli", "train", str(recipe)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 1, r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        found = re.match(
            r"error: the disk is full: (\S+) (was not written|could not be)", errors[0]
        )
        assert found, errors[0]
        named = Path(found.group(1))
        assert named.is_relative_to(run_dir) and ".tmp" not in str(named), errors[0]
        assert "nothing half-written is left" in errors[0]
        hint = r.stderr.splitlines()[r.stderr.splitlines().index(errors[0]) + 1]
        assert hint.strip().startswith("hint: free space") and "df -h" in hint
        (fs / "ballast").unlink()
        _nothing_half_written(fs)


class FillsTheDiskAt(UI):
    """A user's view of a disk that fills mid-run: after optimizer step ``at``, something else
    takes all but ``leave`` bytes of it."""

    def __init__(self, fs: Path, at: int, leave: int):
        super().__init__()
        self.fs, self.at, self.leave = fs, at, leave

    def progress(self):
        bar, ui = super().progress(), self

        class Watch:
            def __getattr__(self, name):
                return getattr(bar, name)

            def update(self, step, *a, **k):
                if step == ui.at and not (ui.fs / "ballast").exists():
                    fill(ui.fs, leave=ui.leave)
                return bar.update(step, *a, **k)

        return Watch()


def test_a_disk_that_fills_mid_run_keeps_the_previous_checkpoint_to_resume_from(
    tmp_path, tiny_models, tiny_data
):
    with small_tmpfs(tmp_path / "fs", "400k") as fs:
        m = _recipe(tmp_path, tiny_models, tiny_data, fs / "runs", max_steps=6, checkpoint_every=2)
        m["train"]["log_every"] = 1
        r = recipe_from_mapping(m)
        ckpt_root = r.run_dir / "checkpoints"
        with pytest.raises(FtcliError) as exc:
            train_run(r, FillsTheDiskAt(fs, at=3, leave=8192))
        step4 = ckpt_root / "step-0000004"
        assert re.match(
            rf"the disk is full: {re.escape(str(step4))}/\S+ could not be written, so "
            rf"{re.escape(str(step4))} was not saved",
            exc.value.message,
        ), exc.value.message
        assert [p.name for p in ckpt_root.iterdir()] == ["step-0000002"]
        (fs / "ballast").unlink()
        _nothing_half_written(fs)
        out = train_run(r, UI(), resume=True)  # the previous checkpoint is whole: resume from it
        assert out["status"] == "completed" and out["train"]["resumed_from"] == 2
        assert json.loads((r.run_dir / "run.json").read_text())["resumes"]
