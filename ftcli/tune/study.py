"""``ftcli tune RECIPE``: a hyperparameter study on Optuna (samplers, pruners, storage).

Each trial is a full run folder, ``<output_dir>/<name>/tune/trial-007/``, whose recipe is the base
recipe with the trial's values applied through ``recipe.apply_overrides`` (the ``--set`` path), so
every trial recipe is validated; the recipe loader has already checked that every choice and
bound of the space makes a valid recipe. Trials score the validation split only (their run.json
``eval`` block says ``split: validation``) and report each validation to the pruner through the
training loop's ``Pruning`` record. When no trial is left to run, the best one is scored once on
the sealed test split (tune/best.json), and written as tune/best.yaml, a recipe ``ftcli train``
runs as is.

The study lives in Optuna storage: by default a SQLite file in tune/, or any Optuna URL
(PostgreSQL/MySQL across machines), or a journal file (a path ending in .log/.journal; on shared
disk). Running ``ftcli tune`` again continues the study; several processes on one storage draw
distinct trials from it, run at most ``tune.trials`` together, leave a trial another live process
trains to it, and score the best trial on the test split once. A sampler is re-seeded per trial
from (tune.seed, trial number), so processes started together do not propose the same values and
a one-process study is reproducible. Ctrl-C stops during the current trial after its checkpoint; ``--resume`` continues
that trial from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from ftcli.errors import FtcliError, Interrupted
from ftcli.pipeline import evaluate_run, train_run
from ftcli.recipe import Recipe, apply_overrides, recipe_from_mapping, space_values
from ftcli.runlock import holder_gone, lock_path
from ftcli.train import Pruning, latest_checkpoint
from ftcli.tune.report import fmt, print_table, trial_rows, write_tune_report
from ftcli.ui import UI
from ftcli.util import atomic_write_text, read_json, read_jsonl, write_json

MAXIMIZE = {"accuracy", "macro_f1"}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise FtcliError("ftcli tune needs Optuna", hint="pip install 'ftcli[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def tune_dir(recipe: Recipe) -> Path:
    return recipe.run_dir / "tune"


def make_storage(recipe: Recipe):
    """The study's storage: a SQLite file in tune/ by default, a journal file, or any Optuna URL."""
    _optuna()
    spec = recipe.tune.storage
    root = tune_dir(recipe)
    if spec is None:
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(root / 'study.db').resolve()}"
    if "://" in spec:
        return spec
    if spec.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    raise FtcliError(
        f"tune.storage {spec!r}: neither an Optuna storage URL nor a journal file",
        hint="e.g. sqlite:///study.db, postgresql://user@host/db, or shared/study.log",
    )


def make_sampler(recipe: Recipe, seed: int):
    """TPE or random. The grid is enqueued into the study instead (``enqueue_grid``): Optuna's
    GridSampler stops the study from ``tell`` when its grid is done, which ask-and-tell refuses."""
    optuna = _optuna()
    if recipe.tune.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def enqueue_grid(study, recipe: Recipe) -> int:
    """Queue every point of a grid space once (skipped where the study already holds it, so
    processes that start together queue it once); returns the grid's size."""
    import itertools

    keys = list(recipe.tune.space)
    grid = list(itertools.product(*(space_values(recipe.tune.space[k])[1] for k in keys)))
    for point in grid:
        study.enqueue_trial(dict(zip(keys, point, strict=True)), skip_if_exists=True)
    return len(grid)


def make_pruner(recipe: Recipe):
    optuna = _optuna()
    name = recipe.tune.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(recipe: Recipe):
    optuna = _optuna()
    direction = "maximize" if recipe.tune.metric in MAXIMIZE else "minimize"
    study = optuna.create_study(
        study_name=recipe.name,
        storage=make_storage(recipe),
        sampler=make_sampler(recipe, recipe.tune.seed),
        pruner=make_pruner(recipe),
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise FtcliError(
            f"the stored study {recipe.name!r} {study.direction.name.lower()}s; "
            f"tune.metric {recipe.tune.metric} needs {direction}",
            hint="use another storage, or another name for this study",
        )
    return study


def suggest(trial, recipe: Recipe) -> dict:
    """The trial's value for every key of the space (Optuna's distributions)."""
    out = {}
    for key, spec in recipe.tune.space.items():
        kind, values = space_values(spec)
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, values)
        elif kind == "int":
            out[key] = trial.suggest_int(key, values[0], values[1])
        else:
            out[key] = trial.suggest_float(
                key, float(values[0]), float(values[1]), log=kind == "log_uniform"
            )
    return out


def trial_recipe(recipe: Recipe, params: dict, name: str, output_dir: Path) -> Recipe:
    """The base recipe with ``params`` set through the ``--set`` path, as a run under tune/."""
    data = yaml.safe_load(recipe.to_yaml())
    data.pop("tune", None)
    data["name"] = name
    data["output_dir"] = str(output_dir)
    apply_overrides(data, [(tuple(k.split(".")), v) for k, v in params.items()])
    return recipe_from_mapping(data, file=f"<{name}>")


def last_val_loss(run_dir: Path) -> float | None:
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]
    return rows[-1]["val_loss"] if rows else None


def run_trial(study, trial, recipe: Recipe, ui: UI, resume: bool = False) -> None:
    """Train one trial (validation only) and tell the study how it ended."""
    optuna = _optuna()
    spec = recipe.tune
    params = dict(trial.params) if resume else suggest(trial, recipe)
    name = f"trial-{trial.number:03d}"
    r = trial_recipe(recipe, params, name, tune_dir(recipe))
    if resume and latest_checkpoint(r.run_dir / "checkpoints") is None:
        resume = False  # killed before its first checkpoint: the same parameters, from the start
    trial.set_user_attr("run_dir", str(r.run_dir))
    shown = ", ".join(f"{k}={fmt(v)}" for k, v in params.items())
    ui.step(f"{'resume ' if resume else ''}trial {trial.number}: {shown}")
    try:
        out = train_run(
            r,
            ui,
            resume=resume,
            force=not resume,
            score_split="validation",
            pruning=Pruning(trial, spec.metric),
        )
    except Interrupted:
        trial.set_user_attr("interrupted", True)  # stays RUNNING: --resume continues it
        raise
    except BaseException as exc:
        if isinstance(exc, Exception) and trained_elsewhere(r.run_dir):
            # the run lock refused us: another live process trains this trial, so its state is
            # that process's to tell, not a failure of ours
            ui.warn(f"trial {trial.number} is being trained by another process: left to it")
            return
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    pruned_at = out["train"].get("pruned_at")
    trial.set_user_attr("steps", out["train"]["steps"])
    if pruned_at is not None:
        trial.set_user_attr("pruned_at", pruned_at)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        ui.info(f"  trial {trial.number} pruned at step {pruned_at}")
        return
    if spec.metric == "validation_loss":
        value = last_val_loss(r.run_dir)
    else:
        value = out["eval"]["metrics"][spec.metric]
    if value is None or not math.isfinite(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        ui.info(f"  trial {trial.number}: no finite {spec.metric}; marked failed")
        return
    study.tell(trial, value)
    ui.info(f"  trial {trial.number}: {spec.metric} {value:.4f}")


def trained_elsewhere(run_dir: Path) -> bool:
    """The run folder's lock is held by a process that still runs (or one on another host, which
    cannot be checked): some other worker is training that trial right now."""
    return lock_path(run_dir).exists() and not holder_gone(run_dir)


def over_budget(study, trial, target: int) -> bool:
    """Whether ``trial``, just asked for, is past the study's budget: ``target`` trials numbered
    before it already count (running, paused or finished, in any process). Trial numbers come from
    the storage in one atomic step, so workers that checked the count together and all asked
    agree on which of them are extra, whatever the storage."""
    before = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and t.state.name != "WAITING"
    ]
    return len(before) >= target


def give_back(study, trial) -> None:
    """Return a trial asked past the budget to the queue, unrun (WAITING, no values): the next
    study with room for it takes it instead of asking for a new one."""
    optuna = _optuna()
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)


@contextlib.contextmanager
def scoring_lock(root: Path, ui: UI, number: int) -> Iterator[None]:
    """One worker at a time scores the best trial on the test split (an exclusive ``flock`` on
    tune/.best.lock, let go when the process ends however it ends)."""
    with open(root / ".best.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ui.info(f"another process is scoring trial {number} on the test split: waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def orphaned(trial) -> bool:
    """A RUNNING trial whose process is gone without saying so (kill -9, a crash, a reboot): its
    run folder's lock names a pid on this machine that no longer runs. A trial another live
    process trains, here or on another host, is never taken for one."""
    run_dir = trial.user_attrs.get("run_dir")
    if not run_dir or trial.user_attrs.get("interrupted"):
        return False
    return holder_gone(Path(run_dir))


def _counts(study) -> tuple[int, int, int]:
    """(finished, running, paused) trials in the storage, all processes together; paused ones
    were stopped by Ctrl-C and wait for ``--resume`` (they hold their place in the budget)."""
    finished = running = paused = 0
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING":
            if t.user_attrs.get("interrupted"):
                paused += 1
            else:
                running += 1
        elif t.state.is_finished():
            finished += 1
    return finished, running, paused


def tune(
    recipe: Recipe,
    ui: UI,
    trials: int | None = None,
    timeout: float | None = None,
    resume: bool = False,
) -> dict:
    """Run (or continue) the study until it holds ``trials`` trials or ``timeout`` seconds pass."""
    if recipe.tune is None:
        raise FtcliError(
            "the recipe has no tune: section",
            hint="add tune: {space: {train.optimizer.lr: {log_uniform: [1.0e-5, 1.0e-2]}}}",
        )
    optuna = _optuna()
    target = trials or recipe.tune.trials
    study = open_study(recipe)
    if recipe.tune.sampler == "grid":
        target = min(target, enqueue_grid(study, recipe))
    root = tune_dir(recipe)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    states = (optuna.trial.TrialState.RUNNING,)
    for t in study.get_trials(states=states):
        if orphaned(t):  # resumable like a Ctrl-C'd trial, from its last checkpoint
            optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)
            ui.warn(f"trial {t.number}'s process is gone (killed?); --resume continues it")
    interrupted = [t for t in study.get_trials(states=states) if t.user_attrs.get("interrupted")]
    try:
        if resume:
            if not interrupted:
                ui.info("nothing interrupted to resume; continuing the study")
            for frozen in interrupted:
                run_dir = frozen.user_attrs.get("run_dir")
                if run_dir and trained_elsewhere(Path(run_dir)):
                    ui.info(f"trial {frozen.number} is being resumed by another process")
                    continue
                trial = optuna.trial.Trial(study, frozen._trial_id)
                trial.set_user_attr("interrupted", False)
                run_trial(study, trial, recipe, ui, resume=True)
        elif interrupted:
            ui.info(
                f"trial(s) {', '.join(str(t.number) for t in interrupted)} were interrupted: "
                "--resume continues them"
            )
        while True:
            if sum(_counts(study)) >= target:
                break
            if timeout is not None and time.monotonic() - t0 >= timeout:
                ui.info(f"--timeout {timeout:g}s reached: no new trial started")
                break
            trial = study.ask()
            if over_budget(study, trial, target):
                give_back(study, trial)  # other processes took the last places meanwhile
                break
            study.sampler = make_sampler(recipe, recipe.tune.seed * 100_003 + trial.number)
            run_trial(study, trial, recipe, ui)
    except Interrupted as exc:
        ui.info(
            f"study stopped: trial interrupted at step {exc.step}, checkpoint saved; "
            f"continue it with: ftcli tune <recipe> --resume"
        )
        raise KeyboardInterrupt from None
    return finish(study, recipe, ui)


def importances(study) -> dict[str, float]:
    """optuna.importance (fANOVA) over the completed trials; empty when too few to say."""
    optuna = _optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if (
        len({tuple(sorted(t.params.items())) for t in complete}) < 2
        or len({t.value for t in complete}) < 2
    ):
        return {}  # nothing varied, or every trial scored the same: no share of variance to give
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def finish(study, recipe: Recipe, ui: UI) -> dict:
    """The table, the best trial (scored once on test when the study is done), best.yaml, report."""
    spec = recipe.tune
    root = tune_dir(recipe)
    rows = trial_rows(study)
    print_table(ui, recipe, rows)
    done, running, paused = _counts(study)
    complete = [r for r in rows if r["state"] == "complete"]
    result: dict = {
        "name": recipe.name,
        "metric": spec.metric,
        "direction": study.direction.name.lower(),
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "trials": rows,
        "finished": done,
        "running": running,
        "paused": paused,
        "tune_dir": str(root),
    }
    if not complete:
        ui.info("no trial has completed yet: no best trial")
        return result
    best = study.best_trial
    best_dir = Path(best.user_attrs["run_dir"])
    best_recipe = trial_recipe(recipe, best.params, f"{recipe.name}-best", Path(recipe.output_dir))
    atomic_write_text(root / "best.yaml", best_recipe.to_yaml())
    result["best"] = {
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "run_dir": str(best_dir),
        "recipe": str(root / "best.yaml"),
    }
    ui.info(
        f"best: trial {best.number}, validation {spec.metric} {best.value:.4f}; "
        f"recipe {root / 'best.yaml'}"
    )
    best_json = root / "best.json"
    if running:
        ui.info(
            f"{running} trial(s) still running in other processes: the last process to finish "
            "scores the best trial on the sealed test split"
        )
    else:
        # workers that end together both get here: under the lock the second finds best.json
        with scoring_lock(root, ui, best.number):
            previous = read_json(best_json) if best_json.exists() else {}
            if previous.get("number") == best.number:
                test = previous["test"]
            else:
                ui.step(f"evaluate trial {best.number} once on the sealed test split")
                test = evaluate_run(best_dir, ui, split="test")
                write_json(best_json, {"number": best.number, "test": test})
        result["best"]["test"] = test
    result["importances"] = importances(study)
    result["report"] = str(write_tune_report(result, root))
    ui.info(f"report: {result['report']}")
    return result
