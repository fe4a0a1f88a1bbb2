"""Training speed and memory: ftcli's loop (defaults) vs the plain transformers + peft way (Trainer)
and TRL's SFTTrainer, on the same examples.

Every side trains the same model with the same LoRA set-up on the same tokenized examples (ftcli's
tokenization of the recipe's first steps x batch training examples: one pass), batch size,
optimizer, learning rate and schedule, each in a fresh subprocess (peak RSS is a per-process
high-water mark); sides alternate within a round, and rounds reverse the order, so drift in a
shared machine's load hits all of them. Reported per side (median over rounds):

- real tokens/s: non-pad tokens of the examples / wall time of the training call;
- peak RSS (MiB) of the process; with --tensor-peak instead the peak of live tensor bytes during
  the training call plus the model's weights, counted op by op (ftcli.memory.live): the same
  figure whatever the C library's heap keeps resident;
- the final training loss on equal examples: the trained model's mean loss over the same training
  examples, computed by the same code for every side (fp32, no dropout);
- the ratio of real tokens/s to the Trainer default, and the share of the machine's measured
  matmul peak (bench/peak.py at these shapes): LoRA ~ 4 FLOPs per linear weight per real token.

    python bench/train_speed.py                      # all cases, 2 rounds
    python bench/train_speed.py --cases chat --steps 20 --rounds 2 --json
    python bench/train_speed.py --tensor-peak --rounds 1   # memory only: tokens/s runs slower

Cases and sides:
  quickstart   MiniLM-L6 LoRA classification: ftcli | trainer (DataCollatorWithPadding) |
               trainer-grouped (train_sampling_strategy="group_by_length": see
               docs/traps.md#length-grouping-in-trainer) |
               trainer-grouped-bf16 (the same with bf16=True: the best Trainer set-up on a
               CPU with native bf16, where ftcli's auto picks bf16)
  smollm2-cls  SmolLM2-135M LoRA sentiment: the same four
  chat         SmolLM2-135M chat SFT on chatterbot: ftcli | ftcli-gc (gradient checkpointing,
               as TRL's SFTConfig defaults to) | trainer (completion-only labels,
               DataCollatorForSeq2Seq pads them with -100) | trainer-bf16 | trl |
               trl-padding-free | trl-packing
               (TRL's padding-free/packing pass position ids without a mask: on CPU/SDPA that
               leaks attention across examples: docs/traps.md#packing-needs-a-mask; timed anyway,
               marked in the table)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLS_SIDES = ["ftcli", "trainer", "trainer-grouped", "trainer-grouped-bf16"]
CASES = {
    "quickstart": ("quickstart", 32, CLS_SIDES),
    "smollm2-cls": ("smollm2-sentiment-lora", 16, CLS_SIDES),
    "chat": (
        "smollm2-chat-lora",
        8,
        ["ftcli", "ftcli-gc", "trainer", "trainer-bf16", "trl", "trl-padding-free", "trl-packing"],
    ),
}
LEAKY = {"trl-padding-free", "trl-packing"}  # position ids without a mask on SDPA


DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # cuda: bench/gpu_smoke.sh stage 5
TENSOR_PEAK = os.environ.get("BENCH_TENSOR_PEAK") == "1"  # set by --tensor-peak for its children


def bench_overrides(
    kind: str, device: str, steps: int, batch: int, extra: list[str] | tuple = ()
) -> list[str]:
    """The --set overrides a side's recipe gets: one pass over steps x batch examples, no merge,
    the bench's device; bf16 compute for a QLoRA base on CUDA only (the key is an error for any
    other method.kind); ``extra`` (--set) last, so it wins."""
    out = [
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.eval_every=100000",
        "train.log_every=1",
        "merge.enabled=false",
        f"train.device={device}",
    ]
    if device == "cuda" and kind == "qlora":
        out.append("method.quantization.compute_dtype=bfloat16")
    return [*out, *extra]


def _prepare(recipe_name: str, steps: int, batch: int, extra: list[str] | tuple = ()):
    """The bundled recipe (bounded to one pass over steps x batch examples), its tokenizer and
    features (a plain list)."""
    from ftcli.bundled import recipe_path
    from ftcli.data.examples import prepare
    from ftcli.data.tokenize import tokenize
    from ftcli.models import load_tokenizer
    from ftcli.recipe import load_recipe

    path = recipe_path(recipe_name)
    kind = load_recipe(path, list(extra)).method.kind  # read first: the overrides depend on it
    recipe = load_recipe(path, bench_overrides(kind, DEVICE, steps, batch, extra))
    tok, _, model_dir = load_tokenizer(recipe.model)
    prepared = prepare(recipe)
    train = prepared.splits["train"]
    feats = tokenize(train[: steps * batch], recipe, tok, prepared.label2id).features
    return recipe, tok, model_dir, prepared, feats[: len(feats)]


def _linear_weights(model) -> int:
    """Weights of the linear layers a token passes through (the causal LM head excluded)."""
    import torch

    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )


def _equal_examples_loss(model, feats, pad_id: int, task: str) -> float:
    """Mean loss of the trained model over the training examples: the same code for every side."""
    import torch

    from ftcli.data.tokenize import collate
    from ftcli.forward import loss_sums

    model.eval()
    total = count = 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(feats), 32):
            batch = {k: v.to(device) for k, v in collate(feats[s : s + 32], pad_id).items()}
            s_, c = loss_sums(model, batch, task)
            total, count = total + float(s_), count + float(c)
    return total / count


def run_ftcli(recipe, tok, model_dir, prepared, feats) -> dict:
    from ftcli.adapt import adapt
    from ftcli.data.tokenize import Tokenized
    from ftcli.pipeline import make_accelerator
    from ftcli.train import train

    acc, device = make_accelerator(recipe)
    adapted = adapt(recipe, tok, model_dir, prepared.labels, device)
    tokenized = {"train": Tokenized(feats, 0, 0, 0), "validation": Tokenized([], 0, 0, 0)}
    with tempfile.TemporaryDirectory() as tmp, Timed(adapted.model) as timed:
        out = train(recipe, acc, adapted, tokenized, Path(tmp))
    return {
        **timed.result,
        "model": adapted.model,
        "mixed_precision": out.mixed_precision,
        "padding_efficiency": out.padding_efficiency,
    }


class Timed:
    """The wall time of a training call and, with --tensor-peak, the peak of live tensor bytes in
    it plus the model's own weights (allocator-independent; the op-by-op count slows the call)."""

    def __init__(self, model):
        self.own, self.live = [*model.parameters(), *model.buffers()], None

    def __enter__(self):
        _sync()  # a CUDA clock starts after the queued work before it has run
        if DEVICE == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()  # the timed call's own peak, warm-up excluded
        if TENSOR_PEAK:
            from ftcli.memory.live import LiveTensors

            self.live = LiveTensors(exclude=self.own)
            self.live.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()  # ... and stops when the GPU has finished the call's kernels
        self.result = {"seconds": time.perf_counter() - self.t0}
        if self.live is not None:
            self.live.__exit__(*exc)
            own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.own}
            self.result["tensor_peak_MiB"] = (sum(own.values()) + self.live.peak) / 2**20


def _sync() -> None:
    """Wait for the GPU's queued kernels (CUDA runs asynchronously: a host clock alone measures
    the launches, not the work)."""
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def _peft(model, recipe, task_type: str):
    from peft import LoraConfig, get_peft_model

    m = recipe.method
    return get_peft_model(
        model,
        LoraConfig(
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=m.target_modules,
            task_type=task_type,
        ),
    )


def _args(recipe, tmp: str, batch: int, steps: int, bf16: bool = False, **kw) -> dict:
    o, s = recipe.train.optimizer, recipe.train.scheduler
    return dict(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(s.name, s.name),
        warmup_steps=s.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        max_grad_norm=recipe.train.max_grad_norm or 0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=DEVICE == "cpu",
        bf16=DEVICE == "cuda" or bf16,  # what a GPU user sets; on CPU the default is fp32
        seed=recipe.train.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


def run_trainer(side: str, recipe, tok, model_dir, prepared, feats, steps: int, batch: int):
    """What a user writes with transformers + peft (and TRL) alone."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    causal = recipe.task == "causal_lm"
    if causal:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.to(DEVICE)
        model = _peft(model, recipe, "CAUSAL_LM")
    else:
        labels = prepared.labels
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            pad_token_id=tok.pad_token_id,
            dtype=torch.float32,
        ).to(DEVICE)
        model = _peft(model, recipe, "SEQ_CLS")
    data = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats]
    # the bf16 sides: what a user sets on a CPU with native bf16 (ftcli's auto picks it there)
    bf16 = side.endswith("bf16")
    with tempfile.TemporaryDirectory() as tmp:
        if side.startswith("trl"):
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            cfg = SFTConfig(
                **_args(recipe, tmp, batch, steps, bf16),
                # the examples are ftcli's, already truncated; TRL refuses padding_free with a
                # max_length it would not enforce
                max_length=None if side == "trl-padding-free" else recipe.data.max_length,
                padding_free=side == "trl-padding-free",
                packing=side == "trl-packing",
                dataset_num_proc=None,
            )
            trainer = SFTTrainer(
                model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok
            )
        else:
            grouped = "grouped" in side
            extra = {"train_sampling_strategy": "group_by_length"} if grouped else {}
            collator = (
                DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
                if causal
                else DataCollatorWithPadding(tok)
            )
            for row, f in zip(data, feats, strict=True):
                row["attention_mask"] = f["attention_mask"]
            trainer = Trainer(
                model=model,
                args=TrainingArguments(**_args(recipe, tmp, batch, steps, bf16, **extra)),
                train_dataset=data,
                data_collator=collator,
            )
        with Timed(trainer.model) as timed:
            trainer.train()
    return {
        **timed.result,
        "model": trainer.model,
        "mixed_precision": "bf16" if DEVICE == "cuda" or bf16 else "no",
    }


def _run_side(side: str, recipe, tok, model_dir, prepared, feats, steps: int, batch: int):
    if side.startswith("ftcli"):
        if side == "ftcli-gc":  # TRL's SFTConfig checkpoints by default: the like-for-like side
            recipe = recipe.model_copy(
                update={"train": recipe.train.model_copy(update={"gradient_checkpointing": True})}
            )
        return run_ftcli(recipe, tok, model_dir, prepared, feats)
    return run_trainer(side, recipe, tok, model_dir, prepared, feats, steps, batch)


def child(side: str, case: str, steps: int, warmup: int = 0, extra: list[str] | tuple = ()) -> None:
    from ftcli.ui import quiet_libraries

    quiet_libraries()
    recipe_name, batch, _ = CASES[case]
    recipe, tok, model_dir, prepared, feats = _prepare(recipe_name, steps, batch, extra)
    if warmup:
        # steady state: a first call of `warmup` steps on its own model pays for the kernels'
        # first launches, autotuning and the allocator's growth; only the second call is timed
        w = recipe.model_copy(
            update={"train": recipe.train.model_copy(update={"max_steps": warmup})}
        )
        _run_side(side, w, tok, model_dir, prepared, feats[: warmup * batch], warmup, batch)
        import gc

        gc.collect()
        if DEVICE == "cuda":
            import torch

            torch.cuda.empty_cache()
    out = _run_side(side, recipe, tok, model_dir, prepared, feats, steps, batch)
    if DEVICE == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**20  # the GPU's high-water mark
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = out.pop("model")
    real = sum(len(f["input_ids"]) for f in feats)
    out.update(
        real_tokens=real,
        tokens_per_s=real / out["seconds"],
        peak_rss_MiB=peak,
        final_loss=_equal_examples_loss(model, feats, tok.pad_token_id, recipe.task),
        linear_weights=_linear_weights(model),
        mean_tokens=real / len(feats),
        # the GEMM that dominates a step: real tokens of a batch x hidden -> feed-forward width
        gemm=[
            batch * round(real / len(feats)),
            model.config.hidden_size,
            getattr(model.config, "intermediate_size", 4 * model.config.hidden_size),
        ],
    )
    print(json.dumps(out))


def _peak(shapes: list[list[int]]) -> dict:
    """GEMM GFLOP/s of this machine at the benchmark's shapes (bench/peak.py), fp32 and bf16."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peak.py"), "--json", "--shapes", json.dumps(shapes)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode:
        sys.exit(f"peak.py failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _num(x: float | None, width: int) -> str:
    return f"{x:{width}.2f}" if x is not None else f"{'-':>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--sides", nargs="+", help="only these sides (default: each case's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--warmup",
        type=int,
        default=3 if DEVICE == "cuda" else 0,
        help="untimed steps each side runs first in the same process (default: 3 on CUDA, 0 on "
        "the CPU): the figures are the steady state's",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for every side (repeatable), e.g. model.name=FOLDER",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--tensor-peak",
        action="store_true",
        help="compare peak live tensor bytes (counted op by op: slower, so tokens/s is not "
        "comparable with a plain run) instead of peak RSS",
    )
    ap.add_argument(
        "--no-peak",
        action="store_true",
        help="skip measuring this CPU's matmul peak (bench/peak.py): no %% peak column",
    )
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.steps, a.warmup, a.overrides)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["BENCH_TENSOR_PEAK"] = "1" if a.tensor_peak else "0"
    mem = "tensor_peak_MiB" if a.tensor_peak else "peak_rss_MiB"
    results = []
    load = [os.getloadavg()]
    for case in a.cases:
        sides = [s for s in CASES[case][2] if not a.sides or s in a.sides]
        got: dict[str, list[dict]] = {s: [] for s in sides}
        for i in range(a.rounds):
            for side in sides if i % 2 == 0 else sides[::-1]:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        *("--child", side, case, "--steps", str(a.steps)),
                        *("--warmup", str(a.warmup)),
                        *(f"--set={o}" for o in a.overrides),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                if proc.returncode:
                    err = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    got[side].append({"error": err[0][:200]})
                else:
                    got[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{case} {side} round {i + 1}: {got[side][-1]}", file=sys.stderr, flush=True)
        for side, rows in got.items():
            ok = [r for r in rows if "error" not in r]
            if not ok:
                results.append({"case": case, "side": side, "error": rows[0]["error"]})
                continue
            med = {
                k: statistics.median(r[k] for r in ok)
                for k in ("tokens_per_s", "peak_rss_MiB", "final_loss", "seconds", mem)
            }
            results.append(
                {
                    "case": case,
                    "side": side,
                    **med,
                    "mixed_precision": ok[0]["mixed_precision"],
                    "padding_efficiency": ok[0].get("padding_efficiency"),
                    "linear_weights": ok[0]["linear_weights"],
                    "gemm": ok[0]["gemm"],
                    "runs": len(ok),
                    "leaks_attention": side in LEAKY,
                }
            )
        load.append(os.getloadavg())
    # the share of the machine's matmul peak: GEMMs of (batch x mean length) tokens by each layer
    shapes = sorted({tuple(r["gemm"]) for r in results if "error" not in r})
    peak = _peak([list(s) for s in shapes]) if DEVICE == "cpu" and not a.no_peak else None
    for r in results:
        if "error" in r:
            continue
        # no ratio without a Trainer figure (side not run, or failed): None, not a crash
        base = next((x for x in results if x["case"] == r["case"] and x["side"] == "trainer"), {})
        ok = "tokens_per_s" in base
        r["ratio_vs_trainer"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
        r["memory_vs_trainer"] = r[mem] / base[mem] if ok else None
        r["peak_share"] = None
        if peak:
            shape = "x".join(map(str, r["gemm"]))
            gflops = peak[shape]["bf16" if r["mixed_precision"] == "bf16" else "fp32"]
            r["peak_share"] = 4 * r["linear_weights"] * r["tokens_per_s"] / (gflops * 1e9)
    summary = {"load_average": [round(x, 2) for x in load[0] + load[-1]], "results": results}
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"load average (1/5/15 min) at start, end: {summary['load_average']}")
    print(
        f"{'case':12} {'side':17} {'prec':5} {'real tok/s':>10} {'x trainer':>9} "
        f"{'tensor MiB' if a.tensor_peak else 'peak MiB':>9}"
        f" {'x mem':>6} {'loss':>7} {'pad eff':>7} {'% peak':>7}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['case']:12} {r['side']:17} failed: {r['error']}")
            continue
        pe = r["padding_efficiency"]
        print(
            f"{r['case']:12} {r['side'] + ('*' if r['leaks_attention'] else ''):17} "
            f"{r['mixed_precision']:5} {r['tokens_per_s']:10.0f} {_num(r['ratio_vs_trainer'], 9)} "
            f"{r[mem]:9.0f} {_num(r['memory_vs_trainer'], 6)} {r['final_loss']:7.4f} "
            f"{pe if pe is None else round(pe, 3)!s:>7} "
            + (f"{100 * r['peak_share']:6.1f}%" if r["peak_share"] is not None else "      -")
        )
    if any(r.get("leaks_attention") for r in results):
        print("* position ids without a mask leak attention (docs/traps.md#packing-needs-a-mask)")


if __name__ == "__main__":
    main()
