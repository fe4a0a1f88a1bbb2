"""The study's bookkeeping between workers, without training: a trial another live process trains
is left to it, and the best trial is scored on the test split once when workers end together.
``train_run`` is replaced by one that takes the real run lock (as ``pipeline.train_run`` does
first) and scores nothing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ftcli.tune.study as study_mod
from ftcli.recipe import recipe_from_mapping
from ftcli.runlock import run_lock
from ftcli.ui import UI


def base(tmp_path, **tune) -> dict:
    return {
        "name": "s",
        "task": "classification",
        "model": {"name": "unused"},
        "data": {"path": "x.csv", "label_column": "label"},
        "method": {"kind": "lora"},
        "output_dir": str(tmp_path / "runs"),
        "tune": {"space": {"method.r": {"choice": [4, 8]}}, "metric": "accuracy", **tune},
    }


HOLD = (
    "import sys, time; from pathlib import Path; from ftcli.runlock import acquire; "
    "acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)"
)


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    """A live process that holds ``run_dir``'s run lock (it trains that run) for the block."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def fake_training(monkeypatch):
    """train_run takes the run lock and scores 0.5; evaluate_run records the split it scores."""
    trained: list[str] = []
    scored: list[str] = []
    before: list = []

    def train_run(r, ui, **kwargs):
        for hook in before:
            hook(r)
        with run_lock(r.run_dir):
            trained.append(r.name)
        return {"train": {"steps": 1}, "eval": {"metrics": {"accuracy": 0.5}}}

    def evaluate_run(run_dir, ui, split="test"):
        scored.append(split)
        time.sleep(0.5)  # long enough for a second worker to arrive while this one scores
        return {"metrics": {"accuracy": 0.25}}

    monkeypatch.setattr(study_mod, "train_run", train_run)
    monkeypatch.setattr(study_mod, "evaluate_run", evaluate_run)
    monkeypatch.setattr(study_mod, "write_tune_report", lambda result, root: root / "report.html")
    return trained, scored, before


def states(recipe) -> dict[int, str]:
    return {t.number: t.state.name for t in study_mod.open_study(recipe).get_trials()}


def test_resume_leaves_a_trial_another_live_process_trains(tmp_path, fake_training):
    """Two ``--resume`` workers see the same interrupted trial: the one that finds its run folder
    locked by the other (alive) neither fails the trial in the study nor stops: it trains a new
    one."""
    trained, _, _ = fake_training
    r = recipe_from_mapping(base(tmp_path, trials=2))
    study = study_mod.open_study(r)
    t = study.ask()
    run_dir = study_mod.tune_dir(r) / "trial-000"
    t.set_user_attr("run_dir", str(run_dir))
    t.set_user_attr("interrupted", True)
    with held_by_another_process(run_dir):
        out = study_mod.tune(r, UI(), resume=True)
        assert states(r) == {0: "RUNNING", 1: "COMPLETE"}
    assert trained == ["trial-001"]
    assert [row["state"] for row in out["trials"]] == ["running", "complete"]


def test_a_lock_refused_inside_the_trial_does_not_fail_it(tmp_path, fake_training):
    """Another process takes the trial's run lock between the check and this worker's own
    ``train_run``: the refusal leaves the trial to that process, and this one goes on."""
    trained, _, before = fake_training
    r = recipe_from_mapping(base(tmp_path, trials=2))
    study = study_mod.open_study(r)
    t = study.ask()
    t.set_user_attr("run_dir", str(study_mod.tune_dir(r) / "trial-000"))
    t.set_user_attr("interrupted", True)
    with contextlib.ExitStack() as stack:

        def grab(recipe):
            if recipe.name == "trial-000":
                stack.enter_context(held_by_another_process(recipe.run_dir))

        before.append(grab)
        study_mod.tune(r, UI(), resume=True)
        assert states(r) == {0: "RUNNING", 1: "COMPLETE"}
    assert trained == ["trial-001"]


def test_workers_ending_together_score_the_best_trial_on_test_once(tmp_path, fake_training):
    _, scored, _ = fake_training
    r = recipe_from_mapping(base(tmp_path))
    study = study_mod.open_study(r)
    for value in (0.6, 0.8):
        t = study.ask()
        t.suggest_categorical("method.r", [4, 8])
        t.set_user_attr("run_dir", str(tmp_path / f"t{t.number}"))
        study.tell(t, value)
    barrier = threading.Barrier(2)
    outs: list[dict] = []
    errors: list[BaseException] = []

    def worker():
        try:
            mine = study_mod.open_study(r)  # its own connection, as another process has
            barrier.wait()
            outs.append(study_mod.finish(mine, r, UI()))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert scored == ["test"]
    assert [o["best"]["number"] for o in outs] == [1, 1]
    assert [o["best"]["test"] for o in outs] == [{"metrics": {"accuracy": 0.25}}] * 2
