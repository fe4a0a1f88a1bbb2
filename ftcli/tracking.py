"""Experiment tracking through accelerate's trackers (``train.report_to``).

TensorBoard writes event files under ``<run>/tb/``; MLflow logs to ``train.mlflow_uri``,
``MLFLOW_TRACKING_URI`` or a local SQLite store ``<output_dir>/mlflow.db`` (artifacts beside it in
``<output_dir>/mlartifacts/``); W&B runs offline unless the user has logged in. The loop feeds
them with ``accelerator.log``; ``finish`` adds the test metrics and the run's key files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.recipe import Recipe

EXPERIMENT = "ftcli"  # MLflow experiment / W&B project; MLFLOW_EXPERIMENT_NAME overrides it
ARTIFACT_FILES = ("recipe.yaml", "run.json", "metrics.jsonl")


def mlflow_uri(recipe: Recipe) -> str:
    """Where MLflow logs: the recipe's URI, the environment's, or a SQLite file beside the runs."""
    if recipe.train.mlflow_uri:
        return recipe.train.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path(recipe.output_dir) / "mlflow.db").resolve())


def trackers(recipe: Recipe) -> list:
    """accelerate tracker objects for ``train.report_to`` (started later, by ``start``)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    out = []
    for name in recipe.train.report_to:
        if name == "tensorboard":
            # run_name "" keeps the event files directly in <run>/tb/
            out.append(TensorBoardTracker("", str(recipe.run_dir / "tb")))
        elif name == "mlflow":
            artifacts = None
            if not (recipe.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
                artifacts = (Path(recipe.output_dir) / "mlartifacts").resolve().as_uri()
            out.append(MLflowTracker(EXPERIMENT, artifacts, run_name=recipe.name))
        elif name == "wandb":
            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            out.append(WandBTracker(EXPERIMENT, name=recipe.name, dir=str(recipe.run_dir)))
    return out


def flat_params(recipe: Recipe) -> dict:
    """The resolved recipe as flat ``section.key`` params (lists as JSON, None as "null")."""
    import yaml

    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, bool | int | float | str):
            out[prefix] = node
        else:
            out[prefix] = json.dumps(node)

    walk("", yaml.safe_load(recipe.to_yaml()))
    return out


def start(accelerator, recipe: Recipe, trainable: int) -> dict:
    """Open the run on every tracker with the recipe as params; return what run.json records."""
    if not recipe.train.report_to:
        return {}
    if "mlflow" in recipe.train.report_to:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri(recipe))
    try:
        accelerator.init_trackers(EXPERIMENT, config=flat_params(recipe))
    except Exception as exc:  # an unreachable server, a locked store: the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FtcliError(
            f"cannot start tracking ({', '.join(recipe.train.report_to)}): {first}",
            hint="check train.mlflow_uri / MLFLOW_TRACKING_URI, or drop train.report_to",
        ) from None
    accelerator.log({"trainable_params": trainable}, step=0)
    info: dict = {"report_to": list(recipe.train.report_to)}
    if "tensorboard" in recipe.train.report_to:
        info["tensorboard_dir"] = str(recipe.run_dir / "tb")
    if "mlflow" in recipe.train.report_to and accelerator.is_main_process:
        run = accelerator.get_tracker("mlflow", unwrap=True)
        info["mlflow"] = {"uri": mlflow_uri(recipe), "run_id": run.info.run_id}
    return info


def finish(accelerator, recipe: Recipe, step: int, test_metrics: dict, failed: bool = False):
    """Log the test metrics and, to MLflow, the run's key files; close every tracker."""
    if not recipe.train.report_to:
        return
    if test_metrics:
        numeric = {
            f"test_{k}": v
            for k, v in test_metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        accelerator.log(numeric, step=step)
    if accelerator.is_main_process and "mlflow" in recipe.train.report_to and not failed:
        tracker = accelerator.get_tracker("mlflow")
        run_dir = recipe.run_dir
        for name in ARTIFACT_FILES:
            if (run_dir / name).exists():
                import mlflow

                mlflow.log_artifact(str(run_dir / name))
        if (run_dir / "adapter").is_dir():  # a full model's weights are left out: too large
            tracker.log_artifacts(str(run_dir / "adapter"), "adapter")
    if failed and accelerator.is_main_process and "mlflow" in recipe.train.report_to:
        import mlflow

        mlflow.end_run(status="FAILED")
    # accelerator.end_training() would also destroy the process group, which the next run of this
    # process (--seeds, cv) still uses: close the trackers alone.
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def log_to_run(run_record: dict, metrics: dict) -> list[str]:
    """Add ``metrics`` (e.g. ``ftcli eval``'s comparison) to the MLflow run a training opened;
    returns where they went (empty when the run was not tracked in MLflow)."""
    info = (run_record.get("tracking") or {}).get("mlflow")
    if not info:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=info["uri"])
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            client.log_metric(info["run_id"], k, float(v))
    return [f"mlflow run {info['run_id']}"]
