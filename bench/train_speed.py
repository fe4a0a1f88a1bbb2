"""Training speed and memory: ftcli's loop vs the plain transformers + peft way (Trainer), same work.

Both sides train the same model with the same LoRA (or full) set-up on the same tokenized examples,
batch size, optimizer, schedule and thread count, for the same number of steps; each run happens in
a fresh subprocess (peak RSS is a per-process high-water mark), and the two alternate so drift in a
shared machine's load hits both. Reported: median seconds per step and peak RSS, as ratios.

    python bench/train_speed.py                       # MiniLM-L6 LoRA (quickstart set-up) and SmolLM2 LoRA
    python bench/train_speed.py --rounds 3 --steps 40 --json
    python bench/train_speed.py --pinned      # glibc's mmap threshold pinned: resident = live tensors

Peak RSS under glibc's default heap also measures how much freed memory the heap keeps, which
depends on allocation order more than on what is live; --pinned compares the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "minilm-lora": ("recipes/quickstart.yaml", 32),
    "smollm2-lora": ("recipes/smollm2-sentiment-lora.yaml", 16),
}


def _prepare(recipe_path: str, steps: int, batch: int):
    """The recipe's tokenizer, tokenized training examples (exactly what ftcli trains on) and recipe."""
    from ftcli.data.examples import prepare
    from ftcli.data.tokenize import tokenize
    from ftcli.models import load_tokenizer
    from ftcli.recipe import load_recipe

    recipe = load_recipe(
        ROOT / recipe_path,
        [
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            "train.eval_every=100000",
            "train.log_every=1",
            "merge.enabled=false",
        ],
    )
    tok, _, model_dir = load_tokenizer(recipe.model)
    prepared = prepare(recipe)
    feats = tokenize(
        prepared.splits["train"][: steps * batch], recipe, tok, prepared.label2id
    ).features
    return recipe, tok, model_dir, prepared, feats


def run_ftcli(recipe_path: str, steps: int, batch: int) -> dict:
    import tempfile

    from accelerate import Accelerator

    from ftcli.adapt import adapt
    from ftcli.data.tokenize import Tokenized
    from ftcli.train import train

    recipe, tok, model_dir, prepared, feats = _prepare(recipe_path, steps, batch)
    adapted = adapt(recipe, tok, model_dir, prepared.labels, "cpu")
    tokenized = {"train": Tokenized(feats, 0, 0, 0), "validation": Tokenized([], 0, 0, 0)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(recipe, Accelerator(cpu=True), adapted, tokenized, Path(tmp))
        seconds = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["s_per_step"] for r in rows if "s_per_step" in r][1:]  # the first step warms up
    return {"s_per_step": statistics.median(per_step), "seconds": seconds}


def run_plain(recipe_path: str, steps: int, batch: int) -> dict:
    """What a user writes with transformers + peft alone: Trainer, a LoraConfig, a data collator."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    recipe, tok, model_dir, prepared, feats = _prepare(recipe_path, steps, batch)
    labels = prepared.labels
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
        pad_token_id=tok.pad_token_id,
        dtype=torch.float32,
    )
    m = recipe.method
    model = get_peft_model(
        model,
        LoraConfig(
            r=m.r,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=m.target_modules,
            task_type="SEQ_CLS",
        ),
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    data = [
        {"input_ids": f["input_ids"], "attention_mask": f["attention_mask"], "labels": f["labels"]}
        for f in feats
    ]
    o = recipe.train.optimizer
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=o.lr,
            weight_decay=o.weight_decay,
            lr_scheduler_type="linear",
            warmup_steps=recipe.train.scheduler.warmup_ratio,  # transformers 5: a float < 1 is a ratio
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=recipe.train.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=DataCollatorWithPadding(tok),
            callbacks=[StepTimer()],
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"s_per_step": statistics.median(times[1:]), "seconds": seconds}


def child(side: str, case: str, steps: int) -> None:
    from ftcli.ui import quiet_libraries

    quiet_libraries()
    recipe_path, batch = CASES[case]
    out = (run_ftcli if side == "ftcli" else run_plain)(recipe_path, steps, batch)
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--pinned", action="store_true", help="pin glibc's mmap threshold (64 KiB) in both sides"
    )
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if a.pinned:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    results = []
    for case in a.cases:
        got: dict[str, list[dict]] = {"ftcli": [], "plain": []}
        for i in range(a.rounds):
            for side in ("ftcli", "plain") if i % 2 == 0 else ("plain", "ftcli"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", side, case, "--steps", str(a.steps)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                if proc.returncode:
                    sys.exit(f"{side} {case} failed:\n{proc.stderr[-3000:]}")
                got[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{case} {side} round {i + 1}: {got[side][-1]}", file=sys.stderr, flush=True)
        med = {
            s: {k: statistics.median(r[k] for r in rows) for k in ("s_per_step", "peak_rss_MiB")}
            for s, rows in got.items()
        }
        results.append(
            {
                "case": case,
                "steps": a.steps,
                "rounds": a.rounds,
                "malloc_pinned": a.pinned,
                "ftcli": med["ftcli"],
                "plain": med["plain"],
                "time_ratio": med["ftcli"]["s_per_step"] / med["plain"]["s_per_step"],
                "memory_ratio": med["ftcli"]["peak_rss_MiB"] / med["plain"]["peak_rss_MiB"],
            }
        )
    if a.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'case':14} {'ftcli s/step':>12} {'plain s/step':>12} {'ratio':>6} {'ftcli MiB':>10} {'plain MiB':>10} {'ratio':>6}"
    )
    for r in results:
        print(
            f"{r['case']:14} {r['ftcli']['s_per_step']:12.3f} {r['plain']['s_per_step']:12.3f} {r['time_ratio']:6.2f} "
            f"{r['ftcli']['peak_rss_MiB']:10.0f} {r['plain']['peak_rss_MiB']:10.0f} {r['memory_ratio']:6.2f}"
        )


if __name__ == "__main__":
    main()
