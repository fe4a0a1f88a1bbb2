"""``mixed_precision: auto`` against float32 and bf16 on this machine: the quickstart's training
loop (ftcli's own, as `ftcli train` runs it) for N steps with ``no``, ``bf16`` and ``auto``, each
in a fresh process, sides alternating within a round and rounds reversing the order, so a shared
machine's load drift hits all three. Prints real tokens/s (median over rounds), each side's ratio
to float32 and to the faster of float32 and bf16, and what ``auto`` chose.

    python bench/precision.py                    # 40 steps, 2 rounds (a few minutes on 2 cores)
    python bench/precision.py --steps 60 --rounds 3 --json

``auto``'s measurement (and its cache) is part of its process: the first auto run of a round
measures (the cache is emptied per round: FTCLI_CACHE points at a fresh folder), so its time is in
the figure only through the process' startup, not the timed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ["no", "bf16", "auto"]


def child(mp: str, steps: int, batch: int) -> dict:
    """One side in this process: prepare, adapt, train ``steps`` steps; the timed loop's figures."""
    from ftcli.adapt import adapt
    from ftcli.bundled import recipe_path
    from ftcli.data.examples import prepare
    from ftcli.data.tokenize import Tokenized, tokenize
    from ftcli.models import load_tokenizer
    from ftcli.pipeline import make_accelerator
    from ftcli.recipe import load_recipe
    from ftcli.train import train
    from ftcli.ui import UI, quiet_libraries

    quiet_libraries()
    recipe = load_recipe(
        recipe_path("quickstart"),
        [
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            "train.eval_every=100000",
            "merge.enabled=false",
            "train.device=cpu",
            f"train.mixed_precision={mp}",
        ],
    )
    tok, _, model_dir = load_tokenizer(recipe.model)
    prepared = prepare(recipe)
    feats = tokenize(
        prepared.splits["train"][: steps * batch], recipe, tok, prepared.label2id
    ).features
    lines: list[str] = []

    class Say(UI):
        def info(self, message: str = "") -> None:
            lines.append(message)

    t0 = time.perf_counter()
    acc, device = make_accelerator(recipe, Say())
    resolve_s = time.perf_counter() - t0
    adapted = adapt(recipe, tok, model_dir, prepared.labels, device)
    tokenized = {"train": Tokenized(feats, 0, 0, 0), "validation": Tokenized([], 0, 0, 0)}
    real = sum(len(f["input_ids"]) for f in feats)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(recipe, acc, adapted, tokenized, Path(tmp))
        seconds = time.perf_counter() - t0
    return {
        "side": mp,
        "mixed_precision": acc.mixed_precision,
        "tokens_per_s": real / seconds,
        "seconds": seconds,
        "resolve_s": resolve_s,
        "said": lines,
    }


def run_side(mp: str, steps: int, batch: int, cache: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FTCLI_CACHE": cache,
    }
    p = subprocess.run(
        [sys.executable, __file__, "--child", mp, "--steps", str(steps), "--batch", str(batch)],
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        sys.exit(f"side {mp} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=SIDES)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.batch)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(a.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        with tempfile.TemporaryDirectory() as cache:  # auto measures afresh each round
            for side in order:
                runs[side].append(run_side(side, a.steps, a.batch, cache))
    tps = {s: statistics.median(x["tokens_per_s"] for x in runs[s]) for s in SIDES}
    best = max(tps["no"], tps["bf16"])
    import torch

    from ftcli.precision import machine_key

    out = {
        "machine": machine_key("cpu"),
        "steps": a.steps,
        "batch": a.batch,
        "rounds": a.rounds,
        "sides": {
            s: {
                "tokens_per_s": round(tps[s], 1),
                "vs_float32": round(tps[s] / tps["no"], 3),
                "vs_faster": round(tps[s] / best, 3),
                "per_round": [round(x["tokens_per_s"], 1) for x in runs[s]],
                "chose": sorted({x["mixed_precision"] for x in runs[s]}),
            }
            for s in SIDES
        },
        "auto_said": [line for x in runs["auto"] for line in x["said"]],
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['machine']}; {a.steps} steps x {a.batch}, {a.rounds} round(s), median")
    print(f"{'mixed_precision':<16}{'tokens/s':>10}{'vs float32':>12}{'vs faster':>11}  chose")
    for s in SIDES:
        d = out["sides"][s]
        print(
            f"{s:<16}{d['tokens_per_s']:>10.0f}{d['vs_float32']:>11.2f}x{d['vs_faster']:>10.2f}x"
            f"  {', '.join(d['chose'])}"
        )
    for line in out["auto_said"]:
        print("  " + line)


if __name__ == "__main__":
    main()
