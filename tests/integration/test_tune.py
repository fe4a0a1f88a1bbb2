"""ftcli tune on the tiny models: a study runs, prunes, resumes, shares one store across
processes, never scores the test split during the study, and writes a best.yaml that trains."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def study_recipe(tmp_path, tiny_models, tiny_data, **tune) -> dict:
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, arch="bert")
    m["name"] = "study"
    m["train"].update(max_steps=8, eval_every=2, log_every=2)
    m["merge"] = {"enabled": True}
    m["tune"] = {
        "trials": 4,
        "sampler": "random",
        "metric": "validation_loss",
        "pruner": "median",
        "space": {
            "train.optimizer.lr": {"log_uniform": [1.0e-5, 3.0e-2]},
            "method.r": {"choice": [2, 4]},
        },
        **tune,
    }
    return m


def test_study_runs_prunes_writes_best_and_scores_test_once(
    tmp_path, tiny_models, tiny_data, capsys, monkeypatch
):
    import ftcli.pipeline as pipeline

    scored: list[str] = []
    real = pipeline.evaluate

    def spy(*args, **kwargs):
        split = args[7] if len(args) > 7 else kwargs.get("split", "test")
        scored.append(split)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    m = study_recipe(tmp_path, tiny_models, tiny_data, trials=6)
    path = write_recipe(tmp_path / "study.yaml", **m)
    code, out = run_cli(capsys, "tune", str(path))
    assert code == 0, out
    assert out["finished"] == 6 and out["running"] == 0
    states = [t["state"] for t in out["trials"]]
    # the median pruner stopped at least one weak trial, with the step it stopped at
    pruned = [t for t in out["trials"] if t["state"] == "pruned"]
    assert pruned, states
    for t in pruned:
        assert t["pruned_at"] is not None and t["pruned_at"] < 8
        assert t["steps"] == t["pruned_at"]
    # every trial is a run folder, scored on validation; the test split scored once, at the end
    root = tmp_path / "runs" / "study" / "tune"
    for t in out["trials"]:
        run = json.loads((Path(t["run_dir"]) / "run.json").read_text())
        assert run["eval"]["split"] == "validation"
        assert Path(t["run_dir"]).parent == root
    assert scored.count("test") == 1 and scored[-1] == "test", scored
    best = out["best"]
    assert "accuracy" in best["test"]["metrics"]
    values = [t["value"] for t in out["trials"] if t["state"] == "complete"]
    assert best["value"] == min(values)
    # the trial recipe is the base with the trial's values set
    trial_recipe = yaml.safe_load((Path(best["run_dir"]) / "recipe.yaml").read_text())
    assert trial_recipe["method"]["r"] == best["params"]["method.r"]
    assert trial_recipe["train"]["optimizer"]["lr"] == pytest.approx(
        best["params"]["train.optimizer.lr"]
    )
    assert "tune" not in trial_recipe
    html = (root / "report.html").read_text()
    assert 'data-plot="history"' in html and 'data-plot="curves"' in html
    assert "sealed test split" in html
    # best.yaml trains as is
    best_yaml = yaml.safe_load((root / "best.yaml").read_text())
    assert best_yaml["method"]["r"] == best["params"]["method.r"]
    assert best_yaml["name"] == "study-best"
    code, run = run_cli(capsys, "train", str(root / "best.yaml"))
    assert code == 0 and run["status"] == "completed"

    # running again with a higher --trials continues the same study (no trial redone)
    scored.clear()
    code, out2 = run_cli(capsys, "tune", str(path), "--trials", "7")
    assert code == 0
    assert [t["number"] for t in out2["trials"]] == list(range(7))
    assert out2["trials"][:6] == [{**t, "seconds": t["seconds"]} for t in out["trials"]] or [
        t["params"] for t in out2["trials"][:6]
    ] == [t["params"] for t in out["trials"]]
    assert scored.count("test") <= 1


def test_interrupted_trial_resumes_from_its_checkpoint(tmp_path, tiny_models, tiny_data, capsys):
    """Ctrl-C inside a trial: the checkpoint is kept and the trial stays open; --resume ends it."""
    import ftcli.train.loop as train_mod  # where the loop looks evaluate_loss up
    from ftcli.recipe import recipe_from_mapping
    from ftcli.tune import open_study, tune
    from ftcli.ui import UI

    m = study_recipe(tmp_path, tiny_models, tiny_data, trials=1, pruner="none")
    m["train"]["checkpoint_every"] = 2
    recipe = recipe_from_mapping(m)
    calls = {"n": 0}
    real = train_mod.evaluate_loss

    def interrupt_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second validation (step 4), after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    train_mod.evaluate_loss = interrupt_once
    try:
        with pytest.raises(KeyboardInterrupt):
            tune(recipe, UI())
    finally:
        train_mod.evaluate_loss = real
    study = open_study(recipe)
    (t,) = study.get_trials()
    assert t.state.name == "RUNNING" and t.user_attrs["interrupted"]
    out = tune(recipe, UI(), resume=True)
    assert [r["state"] for r in out["trials"]] == ["complete"]
    run = json.loads((Path(out["trials"][0]["run_dir"]) / "run.json").read_text())
    assert run["train"]["resumed_from"] is not None and run["train"]["resumed_from"] >= 2
    assert run["train"]["steps"] == 8


def test_a_killed_trial_is_found_and_resumes_from_its_checkpoint(tmp_path, tiny_models, tiny_data):
    """kill -9 during a trial leaves it RUNNING in the store with no word of why; the next
    ``ftcli tune --resume`` sees its run lock's process is gone and continues it from its last
    checkpoint instead of leaving it open forever."""
    import signal
    import time

    from ftcli.recipe import recipe_from_mapping
    from ftcli.tune import open_study, tune
    from ftcli.ui import UI

    m = study_recipe(tmp_path, tiny_models, tiny_data, trials=1, pruner="none")
    m["train"].update(max_steps=400, checkpoint_every=2, eval_every=400, log_every=50)
    path = write_recipe(tmp_path / "study.yaml", **m)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcli", "tune", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    recipe = recipe_from_mapping(m)
    ckpts = Path(recipe.output_dir) / "study" / "tune" / "trial-000" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("step-*/state.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the study ended before a checkpoint was seen"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (t,) = open_study(recipe).get_trials()
    assert t.state.name == "RUNNING" and not t.user_attrs.get("interrupted")
    out = tune(recipe, UI(), resume=True)
    assert [r["state"] for r in out["trials"]] == ["complete"]
    run = json.loads((Path(out["trials"][0]["run_dir"]) / "run.json").read_text())
    assert run["train"]["resumed_from"] >= 2 and run["train"]["steps"] == 400


def test_two_processes_share_one_journal(tmp_path, tiny_models, tiny_data):
    journal = tmp_path / "shared" / "study.log"
    m = study_recipe(
        tmp_path, tiny_models, tiny_data, trials=4, pruner="none", storage=str(journal)
    )
    m["train"]["max_steps"] = 4
    path = write_recipe(tmp_path / "study.yaml", **m)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ftcli", "tune", str(path), "--json"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e[-2000:]
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(
        study_name="study", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    trials = [t for t in study.get_trials() if t.state.name != "WAITING"]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # the budget, not one more
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == len(dirs)  # no trial run twice
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)  # distinct proposals across processes
    # the two processes shared the study: the trials each announced are its own, and together
    # they are the study's (two separate studies would both have trained trial 0)
    started = [{int(n) for n in re.findall(r"▸ trial (\d+):", e)} for _, e in outs]
    assert not started[0] & started[1], started
    assert started[0] | started[1] == {t.number for t in trials}
    # the best trial was scored on the test split by one of them, and both report that score
    assert sum(e.count("once on the sealed test split") for _, e in outs) == 1
    tests = [json.loads(o)["best"].get("test") for o, _ in outs]
    assert [t for t in tests if t is not None] and len({json.dumps(t) for t in tests if t}) == 1


def test_workers_started_together_keep_the_budget_and_score_test_once(tmp_path):
    """Three processes on the default SQLite study start together and ask for trials at the same
    moments: together they run exactly tune.trials trials, and one of them scores the best on the
    test split. Their trials train nothing (tune_worker.py), so the test is about the study."""
    from ftcli.recipe import load_recipe
    from ftcli.tune.study import open_study

    m = {
        "name": "race",
        "task": "classification",
        "model": {"name": "unused"},
        "data": {"path": "x.csv", "label_column": "label"},
        "method": {"kind": "lora"},
        "output_dir": str(tmp_path / "runs"),
        "tune": {
            "trials": 4,
            "sampler": "random",
            "pruner": "none",
            "metric": "accuracy",
            "space": {"train.optimizer.lr": {"log_uniform": [1.0e-5, 1.0e-1]}},
        },
    }
    path = write_recipe(tmp_path / "race.yaml", **m)
    recipe = load_recipe(path)
    open_study(recipe)  # the storage's tables exist before three processes open it at once
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    worker = Path(__file__).with_name("tune_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(path), str(sync)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + 600
        while len(list(sync.glob("ready-*"))) < 3 and time.monotonic() < deadline:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].stderr.read()[-2000:]
            time.sleep(0.05)
        (sync / "go").touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e[-2000:]
    trials = open_study(recipe).get_trials()
    ran = [t for t in trials if t.state.name != "WAITING"]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4, [t.state.name for t in trials]
    assert len({t.user_attrs["run_dir"] for t in ran}) == 4
    best = max(ran, key=lambda t: t.value)
    scored = (sync / "scored.log").read_text().splitlines()
    assert len(scored) == 1 and scored[0].endswith(f"test trial-{best.number:03d}"), scored
    results = [json.loads(o) for o, _ in outs]
    (scorer,) = [r for r in results if "test" in r.get("best", {})]
    assert scorer["best"]["number"] == best.number and scorer["finished"] == 4
    # trials asked past the budget went back to the queue unrun, and are not listed as trials
    assert [r["number"] for r in scorer["trials"]] == sorted(t.number for t in ran)


def test_bad_space_is_reported_before_any_trial(tmp_path, tiny_models, tiny_data, capsys):
    m = study_recipe(tmp_path, tiny_models, tiny_data)
    m["tune"]["space"] = {
        "method.rr": {"choice": [2, 4]},
        "method.r": {"choice": []},
        "train.optimizer.lr": {"uniform": [1.0e-2, 1.0e-4]},
        "method.dropout": {"choice": [0.0, 1.5]},
    }
    path = write_recipe(tmp_path / "bad.yaml", **m)
    lines = path.read_text().splitlines()
    code, out = run_cli(capsys, "tune", str(path))
    assert code == 1
    err = out["error"]

    def line_of(key):
        return next(i for i, s in enumerate(lines, 1) if s.strip().startswith(key + ":"))

    assert f"bad.yaml:{line_of('method.rr')}: tune.space.method.rr" in err and "unknown key" in err
    assert f"bad.yaml:{line_of('method.r')}: tune.space.method.r: empty choice" in err
    assert f"bad.yaml:{line_of('train.optimizer.lr')}: tune.space.train.optimizer.lr: low" in err
    assert "tune.space.method.dropout: the value 1.5 makes an invalid recipe" in err
    assert not (tmp_path / "runs").exists()
