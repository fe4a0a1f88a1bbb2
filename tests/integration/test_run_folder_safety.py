"""``ftcli train`` deletes only what ftcli wrote: a tune study beside a run is never removed,
a folder that is not an ftcli run is refused (even with --force), and --resume's clean-up of
temporary files stays out of the study, where trials of a running tune write theirs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from ftcli.util import remove_leftovers
from tests.conftest import run_cli, tiny_recipe


def _recipe(tmp_path, tiny_models, tiny_data):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data)
    m["train"].update(max_steps=2)
    m["merge"] = {"enabled": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    return path, Path(m["output_dir"]) / m["name"]


def _study(run_dir):
    """What ``ftcli tune`` leaves in a run folder: tune/study.db, a trial, best.yaml."""
    tune = run_dir / "tune"
    (tune / "trial-000" / "checkpoints" / ".step-2.tmp-99").mkdir(parents=True)
    (tune / "study.db").write_bytes(b"SQLite format 3\0" + bytes(range(200)))
    (tune / "best.yaml").write_text("name: best\n")
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tune.rglob("*") if p.is_file()}


def _same(files) -> bool:
    return all(
        p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in files.items()
    )


def test_train_after_tune_keeps_the_study(tmp_path, tiny_models, tiny_data, capsys):
    path, run_dir = _recipe(tmp_path, tiny_models, tiny_data)
    study = _study(run_dir)
    code, out = run_cli(capsys, "train", str(path))
    assert code == 0 and out["status"] == "completed", out
    assert _same(study) and (run_dir / "tune" / "trial-000" / "checkpoints").is_dir()
    # and starting over with --force removes the run, not the study
    code, out = run_cli(capsys, "train", str(path), "--force")
    assert code == 0, out
    assert _same(study) and (run_dir / "run.json").is_file()


def test_a_folder_ftcli_did_not_write_is_never_deleted(tmp_path, tiny_models, tiny_data, capsys):
    """--set output_dir=. --set name=data once deleted ./data."""
    path, _ = _recipe(tmp_path, tiny_models, tiny_data)
    mine = tmp_path / "data"
    (mine / "raw").mkdir(parents=True)
    (mine / "raw" / "corpus.csv").write_text("text,label\nmine,1\n")
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        sets = ["--set", f"output_dir={tmp_path}", "--set", "name=data"]
        code, out = run_cli(capsys, "train", str(path), *sets, *extra)
        assert code == 1, out
        assert "did not write (notes.txt, raw)" in out["error"] and "--set name=NEW" in out["error"]
        assert (mine / "notes.txt").read_text() == "keep me"
        assert (mine / "raw" / "corpus.csv").is_file()


def test_an_unrecorded_start_needs_force(tmp_path, tiny_models, tiny_data, capsys):
    """A folder with ftcli's names but no run.json (killed before it recorded itself, or a user's
    folder that happens to hold recipe.yaml and data/) is not removed without --force."""
    path, run_dir = _recipe(tmp_path, tiny_models, tiny_data)
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: x\n")
    study = _study(run_dir)
    code, out = run_cli(capsys, "train", str(path))
    assert code == 1 and "never recorded itself" in out["error"] and "--force" in out["error"]
    assert (run_dir / "recipe.yaml").read_text() == "name: x\n"
    code, out = run_cli(capsys, "train", str(path), "--force")
    assert code == 0, out
    assert _same(study)


def test_resume_cleanup_stays_out_of_the_study(tmp_path):
    run_dir = tmp_path / "run"
    mine = run_dir / "checkpoints" / ".step-4.tmp-7"
    theirs = run_dir / "tune" / "trial-003" / "checkpoints" / ".step-2.tmp-8"
    mine.mkdir(parents=True)
    theirs.mkdir(parents=True)
    gone = remove_leftovers(run_dir, skip=("tune",))
    assert gone == [mine] and not mine.exists() and theirs.is_dir()
