"""Experiment tracking with the real parts: TensorBoard event files read back with tensorboard's
reader, and a real ``mlflow server`` (SQLite backend) read back through MlflowClient and its UI in
headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ftcli.errors import RecipeError
from ftcli.pipeline import train_run
from ftcli.recipe import recipe_from_mapping
from ftcli.ui import UI
from tests.conftest import tiny_recipe


def _mapping(tmp_path, tiny_models, tiny_data, **train):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="classification", kind="lora")
    m["train"].update(max_steps=6, log_every=2, eval_every=3, **train)
    m["merge"] = {"enabled": False}
    return m


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path, tiny_models, tiny_data, monkeypatch):
    """TensorBoard read back with its own reader; MLflow's default local store beside the runs."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    m = _mapping(tmp_path, tiny_models, tiny_data, report_to=["tensorboard", "mlflow"])
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    db = Path(r.output_dir) / "mlflow.db"
    assert out["tracking"]["mlflow"]["uri"] == f"sqlite:///{db.resolve()}"
    local = MlflowClient(tracking_uri=out["tracking"]["mlflow"]["uri"]).get_run(
        out["tracking"]["mlflow"]["run_id"]
    )
    assert local.info.status == "FINISHED" and "loss" in local.data.metrics
    assert local.info.artifact_uri.startswith((Path(r.output_dir) / "mlartifacts").as_uri())
    assert out["tracking"]["tensorboard_dir"] == str(r.run_dir / "tb")
    acc = EventAccumulator(str(r.run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "trainable_params"} <= tags
    assert {"test_accuracy", "test_macro_f1"} <= tags
    rows = _metrics(r.run_dir)
    want = [(x["step"], x["loss"]) for x in rows if "loss" in x]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, want, strict=True))
    val = [(x["step"], x["val_loss"]) for x in rows if "val_loss" in x]
    got_val = [(e.step, e.value) for e in acc.Scalars("val_loss")]
    assert [s for s, _ in got_val] == [s for s, _ in val]
    # TensorBoard keeps float32: rounding both to 5 places can land either side of a boundary
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got_val, val, strict=True))
    assert acc.Scalars("trainable_params")[0].value == out["params"]["trainable"]
    assert acc.Scalars("test_accuracy")[0].value == pytest.approx(
        out["eval"]["metrics"]["accuracy"], abs=1e-6
    )


def test_report_to_problems_are_recipe_errors(tmp_path, tiny_models, tiny_data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a)
    )
    m = _mapping(tmp_path, tiny_models, tiny_data, report_to=["mlflow", "tensorboard"])
    with pytest.raises(RecipeError) as exc:
        recipe_from_mapping(m)
    text = str(exc.value)
    assert "train.report_to" in text and "mlflow is not installed" in text
    assert "pip install ftcli[tracking]" in text
    assert not (tmp_path / "runs").exists()
    m = _mapping(tmp_path, tiny_models, tiny_data, mlflow_uri="http://x")
    with pytest.raises(RecipeError, match="train.mlflow_uri"):
        recipe_from_mapping(m)
    m = _mapping(tmp_path, tiny_models, tiny_data, report_to=["tensorboard", "tensorboard"])
    with pytest.raises(RecipeError, match="names a tracker twice"):
        recipe_from_mapping(m)
    m = _mapping(tmp_path, tiny_models, tiny_data, report_to=["tensorbord"])
    with pytest.raises(RecipeError, match="did you mean 'tensorboard'"):
        recipe_from_mapping(m)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite backend, torn down after."""
    port = _free_port()
    root = tmp_path / "mlflow-server"
    root.mkdir()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        # no background job runners (a dozen huey processes): the test needs the tracking API and UI
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("w"),  # noqa: SIM115 (lives as long as the server)
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer in 120 s")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.mark.slow
def test_mlflow_server_run_params_metrics_artifacts_and_ui(
    tmp_path, tiny_models, tiny_data, mlflow_server, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    m = _mapping(tmp_path, tiny_models, tiny_data, report_to=["mlflow"], mlflow_uri=mlflow_server)
    m["name"] = "tracked-run"
    r = recipe_from_mapping(m)
    out = train_run(r, UI())
    info = out["tracking"]["mlflow"]
    assert info["uri"] == mlflow_server
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-run"
    params = run.data.params
    assert params["method.kind"] == "lora" and params["method.r"] == "4"
    assert params["train.optimizer.lr"] == str(r.train.optimizer.lr)
    assert json.loads(params["method.target_modules"]) == ["query", "value"]
    history = client.get_metric_history(info["run_id"], "loss")
    rows = [x for x in _metrics(r.run_dir) if "loss" in x]
    assert [h.step for h in history] == [x["step"] for x in rows]
    assert [h.value for h in history] == pytest.approx([x["loss"] for x in rows], abs=1e-6)
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["eval"]["metrics"]["accuracy"])
    assert "val_loss" in run.data.metrics and "grad_norm" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"run.json", "recipe.yaml", "metrics.jsonl", "adapter"} <= arts
    adapter = {a.path for a in client.list_artifacts(info["run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter

    # `ftcli eval --baseline` adds its comparison to the same run
    from ftcli.evaluation.compare import eval_baseline

    report = eval_baseline(r.run_dir, "base", UI(), n_resamples=199)
    assert report["tracked_in"] == [f"mlflow run {info['run_id']}"]
    acc_row = next(s for s in report["significance"] if s["metric"] == "accuracy")
    after = client.get_run(info["run_id"]).data.metrics
    assert after["eval_accuracy_diff"] == pytest.approx(acc_row["diff"])
    assert after["eval_accuracy_baseline"] == pytest.approx(acc_row["baseline"])

    # the MLflow UI shows the run and its loss metric (headless Chromium renders the React page)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")
    exp = run.info.experiment_id
    page = f"{mlflow_server}/#/experiments/{exp}/runs/{info['run_id']}"
    shot = Path(os.environ.get("FTCLI_MLFLOW_SCREENSHOT", tmp_path / "mlflow-run.png"))
    common = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=20000",
        "--window-size=1400,2000",  # tall enough to show the metrics table
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", page], capture_output=True, text=True, timeout=120
    ).stdout
    assert "tracked-run" in dom, dom[-2000:]
    assert "loss" in dom and "test_accuracy" in dom
    subprocess.run([*common, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
