"""Which adaptation strategy wins? Every strategy on the same data, model, steps and seed, one table.

Each strategy is the base recipe plus a few ``--set`` overrides (the same lines its bundled overlay
recipe changes). Every run is ``ftcli train`` in a fresh subprocess (peak RSS is that process's
high-water mark), then ``ftcli eval RUN --baseline LORA_RUN`` pairs it with LoRA r=8 on the same
sealed test examples. Reported: trainable parameters, seconds per step (the training loop's
median), peak RSS, test accuracy with its 95% interval (Wilson) and the paired test
against LoRA r=8 (McNemar exact), each strategy's own learning rate as the recipe default says.

    python bench/strategies.py                                   # MiniLM-L6 + Rotten Tomatoes
    python bench/strategies.py --train-examples 1600 --steps 100 --only lora-r8,dora,ia3
    python bench/strategies.py --recipe recipes/smollm2-sentiment-lora.yaml --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_LORA = ["method.r=null", "method.alpha=null", "method.dropout=null"]
TARGETS = ["method.target_modules=null"]

# name -> --set overrides on the base recipe (a LoRA r=8 recipe such as the quickstart)
STRATEGIES: dict[str, list[str]] = {
    "lora-r8": ["method.r=8", "method.alpha=16"],
    "dora": ["method.r=8", "method.alpha=16", "method.dora=true"],
    "rslora": ["method.r=8", "method.alpha=16", "method.rslora=true"],
    "pissa": ["method.r=8", "method.alpha=16", "method.init=pissa"],
    "lora+": ["method.r=8", "method.alpha=16", "train.optimizer.lora_plus_ratio=16"],
    "lora-top3": ["method.r=8", "method.alpha=16", "method.layers=LAST3"],
    "ia3": ["method.kind=ia3", *NO_LORA, *TARGETS, "train.optimizer.lr=null"],
    "vera": ["method.kind=vera", "method.r=64", "method.alpha=null", "train.optimizer.lr=null"],
    "prefix": ["method.kind=prefix", *NO_LORA, *TARGETS, "train.optimizer.lr=null"],
    "prompt": ["method.kind=prompt", *NO_LORA, *TARGETS, "train.optimizer.lr=null"],
    "ptuning": ["method.kind=ptuning", *NO_LORA, *TARGETS, "train.optimizer.lr=null"],
    "full": ["method.kind=full", *NO_LORA, *TARGETS, "train.optimizer.lr=5.0e-5"],
    "full-unfreeze": [
        "method.kind=full",
        *NO_LORA,
        *TARGETS,
        "train.optimizer.lr=5.0e-5",
        "train.unfreeze={every_steps: STEP6, start_layers: 1}",
    ],
    "lora-mlp-head": ["method.r=8", "method.alpha=16", "model.head={hidden: 256, dropout: 0.1}"],
}


def ftcli(*args: str, env=None) -> tuple[int, str, str, int]:
    """Run ``python -m ftcli ARGS`` in a fresh process: (rc, stdout, stderr, peak RSS bytes)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = proc.communicate()
    # the child's own high-water mark (wait4 was done by communicate; ru_maxrss of children is the
    # largest so far, so runs are ordered and the figure read right after each)
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return proc.returncode, out, err, rss


def wilson(acc: float | None, report: dict) -> list[float] | None:
    """95% Wilson interval of a test accuracy over the report's examples."""
    n = report.get("n") or report.get("examples")
    if acc is None or not n:
        return None
    from scipy.stats import binomtest

    ci = binomtest(round(acc * n), n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def strategy_sets(name: str, n_blocks: int, steps: int) -> list[str]:
    sets = []
    for s in STRATEGIES[name]:
        s = s.replace("LAST3", str(list(range(n_blocks - 3, n_blocks))))
        s = s.replace("STEP6", str(max(1, steps // (n_blocks + 1))))
        sets.append(s)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--train-examples", type=int, default=1600)
    ap.add_argument("--test-examples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated strategy names")
    ap.add_argument("--out", default="runs/bench-strategies")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from ftcli.memory.arch import load_config
    from ftcli.recipe import load_recipe
    from ftcli.strategies import num_blocks

    base = load_recipe(ROOT / a.recipe)
    n_blocks = num_blocks(load_config(base.model.name).config)
    names = [n for n in (a.only.split(",") if a.only else STRATEGIES) if n]
    if "lora-r8" not in names:
        names.insert(0, "lora-r8")
    names.sort(key=lambda n: n != "lora-r8")  # the reference runs first
    common = [
        f"data.max_train_examples={a.train_examples}",
        f"data.max_test_examples={a.test_examples}",
        "data.max_validation_examples=200",
        f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch_size}",
        f"train.seed={a.seed}",
        f"train.eval_every={a.steps}",
        "train.log_every=10",
        "merge.enabled=false",
        f"output_dir={a.out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    t_all = time.perf_counter()
    for name in names:
        sets = [f"name={name}", *common, *strategy_sets(name, n_blocks, a.steps)]
        args = ["train", str(ROOT / a.recipe), "--force", "--json", "--no-memory-check"]
        for s in sets:
            args += ["--set", s]
        rc, out, err, rss = ftcli(*args, env=env)
        if rc != 0:
            rows.append({"strategy": name, "error": (err or out).strip().splitlines()[-1]})
            print(f"{name}: FAILED {rows[-1]['error']}", file=sys.stderr)
            continue
        run = Path(a.out) / name
        run_json = json.loads((ROOT / run / "run.json").read_text())
        metrics = [json.loads(x) for x in (ROOT / run / "metrics.jsonl").read_text().splitlines()]
        s_step = statistics.median(m["s_per_step"] for m in metrics if "s_per_step" in m)
        row = {
            "strategy": name,
            "trainable": run_json["params"]["trainable"],
            "s_per_step": s_step,
            "peak_rss_mib": round(rss / 2**20),
            "accuracy": run_json["eval"]["metrics"].get("accuracy"),
            "accuracy_ci": wilson(run_json["eval"]["metrics"].get("accuracy"), run_json["eval"]),
            "sets": sets[len(common) + 1 :],
        }
        ev = ["eval", str(ROOT / run)]
        if name != "lora-r8":
            ev += ["--baseline", str(ROOT / Path(a.out) / "lora-r8")]
        ev += ["--no-robustness", "--resamples", "2999", "--json"]
        rc, out, err, _ = ftcli(*ev, env=env)
        if rc == 0:
            rep = json.loads(out)
            sig = rep.get("significance") or []
            top = next((s for s in sig if s.get("metric") == "accuracy"), None)
            if top:
                row.update(
                    vs_lora_diff=top["diff"],
                    vs_lora_ci=[top.get("ci_low"), top.get("ci_high")],
                    vs_lora_p=top.get("p_value"),
                    verdict=top.get("verdict"),
                )
        else:
            row["eval_error"] = (err or out).strip().splitlines()[-1]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    wall = time.perf_counter() - t_all
    load = os.getloadavg()
    if a.json:
        print(json.dumps({"rows": rows, "wall_s": wall, "loadavg": load}, indent=1))
        return
    print(
        f"{base.model.name}, {a.train_examples} training examples, {a.steps} steps x batch "
        f"{a.batch_size}, seed {a.seed}; {wall / 60:.1f} min, load average {load[0]:.1f}"
    )
    print(
        "| strategy | trainable | s/step | peak RSS | test accuracy (95% CI) | vs LoRA r=8 (p) |\n"
        "|---|---:|---:|---:|---|---|"
    )
    for r in rows:
        if "error" in r:
            print(f"| {r['strategy']} | failed: {r['error']} | | | | |")
            continue
        ci = r.get("accuracy_ci")
        acc = f"{r['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        vs = "reference"
        if "vs_lora_diff" in r:
            vs = f"{r['vs_lora_diff']:+.3f} (p={r['vs_lora_p']:.3g}, {r['verdict']})"
        print(
            f"| {r['strategy']} | {r['trainable']:,} | {r['s_per_step']:.3f} | "
            f"{r['peak_rss_mib']} MiB | {acc} | {vs} |"
        )


if __name__ == "__main__":
    main()
