"""Several processes on a CPU (gloo), honestly scoped: DDP gradients equal the full-batch gradient;
ftcli's model under raw FSDP2 ``fully_shard`` (LoRA and full) trains like one process and its full
state gathers; the guard stops an FSDP launch that silently is not FSDP. FSDP and DeepSpeed through
accelerate need CUDA: bench/gpu_distributed.sh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _recipe_file(tmp_path, tiny_models, tiny_data, kind: str, **train) -> Path:
    m = tiny_recipe(
        tmp_path, tiny_models, tiny_data, task="classification", kind=kind, arch="llama-random"
    )
    m["train"].update(optimizer={"name": "adamw", "lr": 1.0e-2}, **train)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def _torchrun(tmp_path, mode: str, recipe: Path, ok: bool = True) -> dict:
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_port()), str(WORKER), mode, str(recipe), str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_timeout_s_ends_a_collective_a_rank_never_joins(tmp_path, tiny_models, tiny_data):
    recipe = _recipe_file(tmp_path, tiny_models, tiny_data, "lora", ddp_timeout_s=3)
    r = _torchrun(tmp_path, "timeout", recipe, ok=False)
    assert r["error"] is not None and "Timed out waiting 3000ms" in r["error"], r  # gloo's words
    assert r["waited_s"] < 60, r  # the silent rank sleeps 120 s: without the timeout, a hang


@pytest.mark.slow
def test_ddp_gradients_equal_the_full_batch_gradient(tmp_path, tiny_models, tiny_data):
    r = _torchrun(tmp_path, "ddp", _recipe_file(tmp_path, tiny_models, tiny_data, "lora"))
    assert r["world"] == 2 and r["distributed_type"] == "MULTI_CPU"
    assert r["wrapped"] == "DistributedDataParallel"
    assert r["rank_batch_sizes"] == [4, 4]  # ftcli's loader gave each rank its own half
    assert r["n_grads"] > 4 and r["grad_scale"] > 1e-4
    assert r["grad_max_diff"] < 1e-6 * max(1.0, r["grad_scale"]), r
    assert r["ranks_agree"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp2_fully_shard_on_a_cpu_mesh_matches_one_process(
    tmp_path, tiny_models, tiny_data, kind
):
    r = _torchrun(tmp_path, f"fsdp-{kind}", _recipe_file(tmp_path, tiny_models, tiny_data, kind))
    assert r["wrapped_layers"] == 2 and r["sharded_params"] > 0
    assert r["local_share"] < 0.6  # each rank holds about half of every parameter
    assert r["moved"] > 1e-4  # every trainable weight changed in 3 steps
    assert r["state_max_diff"] < 1e-5, r  # the gathered full state equals one process's


@pytest.mark.slow
def test_fsdp_launch_on_a_cpu_host_is_stopped_by_the_guard(tmp_path, tiny_models, tiny_data):
    """docs/traps.md#fsdp-on-a-cpu-host: `accelerate launch --use_fsdp` on a CPU host cannot shard
    (accelerate 1.15
    raises a bare RuntimeError traceback; older ones ran DistributedType.NO in every rank)."""
    recipe = _recipe_file(tmp_path, tiny_models, tiny_data, "lora")
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--use_fsdp", "--num_processes", "2"]
    cmd += ["--main_process_port", str(_port()), "-m", "ftcli", "train", str(recipe)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    want = "the launch asked for FSDP (ACCELERATE_USE_FSDP) but ftcli runs on cpu"
    assert want in text, text[-3000:]
    assert "ftcli/pipeline.py" not in text  # one message, no traceback from ftcli (the launcher
    # prints its own ChildFailedError after it)
    # stopped before anything was written: at most the output folder the lock was taken in
    runs = tmp_path / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert not runs.exists() or not list(runs.glob(".*.lock"))  # and the lock was let go
