"""One ``ftcli tune`` worker whose trials train nothing, run as its own process by test_tune.py;
not a test itself.

Each trial takes its run folder's lock (as ``train_run`` does first), holds it a moment and scores
validation accuracy = its learning rate; scoring the best trial on the test split appends a line to
SYNC/scored.log. Asking the storage for a trial takes half a second, as a remote database may, so
that workers deciding together whether the budget has room overlap. The worker writes
SYNC/ready-PID and waits for SYNC/go, so that the workers the test starts begin at one moment.
Prints the study's result as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna

import ftcli.tune.study as study
from ftcli.recipe import load_recipe
from ftcli.runlock import run_lock
from ftcli.ui import UI


def main(recipe_path: str, sync_dir: str) -> None:
    sync = Path(sync_dir)

    def train_run(r, ui, **kwargs):
        with run_lock(r.run_dir):
            time.sleep(1.0)
        return {"train": {"steps": 1}, "eval": {"metrics": {"accuracy": r.train.optimizer.lr}}}

    def evaluate_run(run_dir, ui, split="test"):
        with open(sync / "scored.log", "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {split} {Path(run_dir).name}\n")
        time.sleep(1.0)
        return {"metrics": {"accuracy": 0.5}}

    real_ask = optuna.study.Study.ask

    def slow_ask(self, *args, **kwargs):
        time.sleep(0.5)
        return real_ask(self, *args, **kwargs)

    optuna.study.Study.ask = slow_ask
    study.train_run = train_run
    study.evaluate_run = evaluate_run
    recipe = load_recipe(recipe_path)
    (sync / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 600
    while not (sync / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    out = study.tune(recipe, UI(json_mode=True))
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
