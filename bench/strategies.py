"""Which adaptation strategy wins? Every strategy on the same data, model, steps and seed, one table.

Each strategy is an ``extends:`` overlay of the base recipe (the few lines that differ, as the
bundled overlay recipes are), written beside the runs. Every run is ``ftcli train`` in a fresh subprocess (peak RSS is that process's
high-water mark), then ``ftcli eval RUN --baseline LORA_RUN`` pairs it with LoRA r=8 on the same
sealed test examples. Reported: trainable parameters, seconds per step (the training loop's
median), peak RSS, test accuracy with its 95% interval (Wilson) and the paired test
against LoRA r=8 (McNemar exact), each strategy's own learning rate as the recipe default says.

    python bench/strategies.py                                   # MiniLM-L6 + Rotten Tomatoes
    python bench/strategies.py --train-examples 1600 --steps 100 --only lora-r8,dora,ia3
    python bench/strategies.py --recipe smollm2-sentiment-lora --batch-size 16
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
NO_LORA = {"r": None, "alpha": None, "dropout": None, "target_modules": None}
LR_DEFAULT = {"optimizer": {"lr": None}}  # the method's own default learning rate
LORA8 = {"r": 8, "alpha": 16}

# name -> (method, train, model) overlays on the base recipe (a LoRA recipe such as the
# quickstart), written as an ``extends:`` recipe: None removes the base's key, as in YAML's null
STRATEGIES: dict[str, tuple[dict, dict, dict]] = {
    "lora-r8": (LORA8, {}, {}),
    "dora": ({**LORA8, "dora": True}, {}, {}),
    "rslora": ({**LORA8, "rslora": True}, {}, {}),
    "pissa": ({**LORA8, "init": "pissa"}, {}, {}),
    "lora-plus": (
        LORA8,
        {"optimizer": {"lora_plus_ratio": 16}},
        {},
    ),  # LoRA+ (a name is a run folder)
    "lora-plus-lr5e-4": (LORA8, {"optimizer": {"lora_plus_ratio": 16, "lr": 5.0e-4}}, {}),
    "lora-top3": ({**LORA8, "layers": "LAST3"}, {}, {}),
    "lora-mlp-head": (LORA8, {}, {"head": {"hidden": 256, "dropout": 0.1}}),
    "ia3": ({"kind": "ia3", **NO_LORA}, LR_DEFAULT, {}),
    "vera": ({"kind": "vera", "r": 64, "alpha": None}, LR_DEFAULT, {}),
    "prefix": ({"kind": "prefix", **NO_LORA}, LR_DEFAULT, {}),
    "prompt": ({"kind": "prompt", **NO_LORA}, LR_DEFAULT, {}),
    "ptuning": ({"kind": "ptuning", **NO_LORA}, LR_DEFAULT, {}),
    # the same two at 10x their method's default lr: is it the rate or the method?
    "ia3-lr3e-2": ({"kind": "ia3", **NO_LORA}, {"optimizer": {"lr": 3.0e-2}}, {}),
    "vera-lr3e-2": ({"kind": "vera", "r": 64, "alpha": None}, {"optimizer": {"lr": 3.0e-2}}, {}),
    "prompt-lr5e-2": ({"kind": "prompt", **NO_LORA}, {"optimizer": {"lr": 5.0e-2}}, {}),
    "full": ({"kind": "full", **NO_LORA}, {"optimizer": {"lr": 5.0e-5}}, {}),
    "full-unfreeze": (
        {"kind": "full", **NO_LORA},
        {"optimizer": {"lr": 5.0e-5}, "unfreeze": {"every_steps": "STEP", "start_layers": 1}},
        {},
    ),
}


def ftcli(*args: str, env=None) -> tuple[int, str, str, int]:
    """Run ``python -m ftcli ARGS`` in a fresh process: (rc, stdout, stderr, its own peak RSS)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftcli", *args], cwd=ROOT, stdout=out, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


def wilson(acc: float | None, report: dict) -> list[float] | None:
    """95% Wilson interval of a test accuracy over the report's examples."""
    n = report.get("n") or report.get("examples")
    if acc is None or not n:
        return None
    from scipy.stats import binomtest

    ci = binomtest(round(acc * n), n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def overlay(name: str, base: Path, n_blocks: int, steps: int, prompt_kinds) -> dict:
    """The strategy's recipe: ``extends:`` the base, its method/train/model lines on top."""
    method, train, model = (json.loads(json.dumps(x)) for x in STRATEGIES[name])
    if method.get("layers") == "LAST3":
        method["layers"] = list(range(n_blocks - 3, n_blocks))
    if "unfreeze" in train:
        train["unfreeze"]["every_steps"] = max(1, steps // (n_blocks + 1))
    doc = {"extends": str(base), "name": name, "method": method, "train": train}
    if model:
        doc["model"] = model
    if method.get("kind") in prompt_kinds:
        doc["merge"] = None  # nothing to fold
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--recipe", default="quickstart", help="a recipe file, or a bundled recipe's name"
    )
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
    from ftcli.recipe import PROMPT_KINDS, load_recipe, resolve_recipe_path
    from ftcli.strategies import num_blocks

    recipe_src = resolve_recipe_path(a.recipe).resolve()
    base = load_recipe(recipe_src)
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
        f"output_dir={(ROOT / a.out).resolve()}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    t_all = time.perf_counter()
    out_root = (ROOT / a.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        doc = overlay(name, recipe_src, n_blocks, a.steps, PROMPT_KINDS)
        recipe_file = out_root / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        args = ["train", str(recipe_file), "--force", "--json", "--no-memory-check"]
        for s in common:
            args += ["--set", s]
        rc, out, err, rss = ftcli(*args, env=env)
        if rc != 0:
            rows.append({"strategy": name, "error": (err or out).strip().splitlines()[-1]})
            print(f"{name}: FAILED {rows[-1]['error']}", file=sys.stderr)
            continue
        run = out_root / name
        run_json = json.loads((run / "run.json").read_text())
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        s_step = statistics.median(m["s_per_step"] for m in metrics if "s_per_step" in m)
        row = {
            "strategy": name,
            "trainable": run_json["params"]["trainable"],
            "s_per_step": s_step,
            "peak_rss_mib": round(rss / 2**20),
            "accuracy": run_json["eval"]["metrics"].get("accuracy"),
            "accuracy_ci": wilson(run_json["eval"]["metrics"].get("accuracy"), run_json["eval"]),
            "overlay": {k: v for k, v in doc.items() if k not in ("extends", "name")},
        }
        if name == "lora-r8":  # the reference: nothing to pair it with
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            continue
        ev = ["eval", str(run), "--baseline", str(out_root / "lora-r8")]
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
