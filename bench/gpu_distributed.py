"""GPU-only checks of ftcli beyond one device (run by bench/gpu_distributed.sh on a CUDA machine).

Builds a tiny Llama and a tiny dataset (no hub), then trains it through `accelerate launch` with
the shipped configs: FSDP2 (LoRA, full, QLoRA with bnb_4bit_quant_storage), checkpoint + --resume
under FSDP2, DeepSpeed ZeRO-2/3 when deepspeed is installed, and DDP over NCCL when there are two
GPUs. Each case prints one PASS/FAIL/SKIP line with its figures; the exit code counts failures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(work: Path) -> tuple[Path, Path]:
    from tests.conftest import build_tiny_model, sentiment_rows

    model = build_tiny_model("llama-random", work / "tiny-llama")
    data = work / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(256)))
    return model, data


def recipe(work: Path, model: Path, data: Path, name: str, kind: str, **train) -> Path:
    method: dict = {"kind": kind}
    if kind != "full":
        method.update(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    if kind == "qlora":
        method["quantization"] = {"compute_dtype": "bfloat16"}
    m = {
        "name": name,
        "task": "classification",
        "model": {"name": str(model)},
        "data": {
            "path": str(data),
            "text_column": "text",
            "label_column": "label",
            "split": {"validation": 0.1, "test": 0.2, "seed": 0},
            "max_length": 32,
        },
        "method": method,
        "train": {
            "max_steps": 8,
            "batch_size": 8,
            "optimizer": {"name": "adamw", "lr": 5.0e-3},
            "scheduler": {"name": "constant"},
            "log_every": 2,
            "mixed_precision": "bf16",
            "ddp_timeout_s": 120,
            **train,
        },
        "merge": {"enabled": False},
        "output_dir": str(work / "runs"),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def launch(config: str | None, nproc: int, recipe_path: Path, *extra: str, timeout=300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", str(ROOT / "configs/accelerate" / config)]
    cmd += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if not config and nproc > 1:
        cmd += ["--multi_gpu"]
    cmd += ["-m", "ftcli", "train", str(recipe_path), "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    return p, time.time() - t0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(p, run_dir: Path, kind: str) -> tuple[bool, str]:
    if p.returncode != 0:
        return False, f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = [r for r in metrics(run_dir) if "loss" in r]
    losses = [r["loss"] for r in rows]
    norms = [r.get("grad_norm", float("nan")) for r in rows]
    folder = run_dir / ("model" if kind == "full" else "adapter")
    files = sorted(x.name for x in folder.iterdir()) if folder.is_dir() else []
    ok = (
        out["status"] == "completed"
        and all(math.isfinite(x) and x > 0 for x in losses)
        and all(math.isfinite(x) for x in norms)
        and any(f.endswith(".safetensors") for f in files)
    )
    return ok, (
        f"processes {out['num_processes']}, losses {[round(x, 4) for x in losses]}, "
        f"grad_norm {[round(x, 3) for x in norms]}, test accuracy "
        f"{out['eval']['metrics'].get('accuracy')}, saved {files}"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ftcli-gpu-distributed")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("SKIP all: no CUDA GPU visible")
        return 0
    ngpu = torch.cuda.device_count()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work)
    print(f"GPUs: {ngpu} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    failures = 0

    def report(name, ok, detail, secs):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} ({secs:.0f} s): {detail}", flush=True)

    n = min(ngpu, 2)
    for kind in ("lora", "full", "qlora"):
        name = f"fsdp2-{kind}"
        r = recipe(work, model, data, name, kind)
        p, s = launch("fsdp2.yaml", n, r)
        ok, detail = check_run(p, work / "runs" / name, kind)
        report(name, ok, detail, s)

    # checkpoint at step 4, Ctrl-C is not needed: a run of 4 steps, then --resume to 8 steps
    name = "fsdp2-resume"
    r4 = recipe(work, model, data, name, "lora", checkpoint_every=2, keep_checkpoints=2)
    p, s = launch("fsdp2.yaml", n, r4)
    ok, detail = check_run(p, work / "runs" / name, "lora")
    ckpts = sorted(x.name for x in (work / "runs" / name / "checkpoints").glob("step-*"))
    report("fsdp2-checkpoints", ok and len(ckpts) == 2, f"{detail}; checkpoints {ckpts}", s)
    if ckpts:
        # resume from the last checkpoint: the loop restarts there and ends at the same step
        (work / "runs" / name / "adapter").rename(work / "runs" / name / "adapter.first")
        p, s = launch("fsdp2.yaml", n, work / "runs" / name / "recipe.yaml", "--resume")
        ok, detail = check_run(p, work / "runs" / name, "lora")
        if ok:
            out = json.loads(p.stdout.strip().splitlines()[-1])
            detail = f"resumed_from {out['train']['resumed_from']}; {detail}"
            ok = out["train"]["resumed_from"] == int(ckpts[-1].split("-")[1])
        report("fsdp2-resume", ok, detail, s)

    try:
        import deepspeed  # noqa: F401

        have_ds = True
    except ImportError:
        have_ds = False
    for stage in (2, 3):
        name = f"zero{stage}-lora"
        if not have_ds:
            print(f"SKIP {name}: deepspeed is not installed (pip install deepspeed)")
            continue
        r = recipe(work, model, data, name, "lora")
        p, s = launch(f"deepspeed-zero{stage}.yaml", n, r)
        ok, detail = check_run(p, work / "runs" / name, "lora")
        report(name, ok, detail, s)

    if ngpu >= 2:
        name = "ddp-nccl-lora"
        r = recipe(work, model, data, name, "lora")
        p, s = launch("multi-gpu.yaml", 2, r)
        ok, detail = check_run(p, work / "runs" / name, "lora")
        report(name, ok, detail, s)
    else:
        print("SKIP ddp-nccl-lora: needs 2 GPUs (one visible)")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
