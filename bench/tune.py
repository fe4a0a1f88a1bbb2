"""A short ``ftcli tune`` study on the quickstart against the bundled recipe's defaults.

The study and the defaults run get the same short budget (``--steps`` optimizer steps on
``--train`` reviews, ``--test`` sealed test reviews); the study selects on validation accuracy
only, its best trial is scored once on the test split, and the best trial is compared with the
defaults on that same test split, paired (``ftcli eval BEST --baseline DEFAULTS``).

    python bench/tune.py                          # 12 trials, TPE, median pruner
    python bench/tune.py --trials 3 --steps 6     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ftcli import ROOT, ftcli  # noqa: E402

sys.path.insert(0, str(ROOT))
from ftcli.bundled import recipe_path  # noqa: E402

SPACE = {
    "train.optimizer.lr": {"log_uniform": [1.0e-4, 1.0e-2]},
    "method.r": {"choice": [4, 8, 16]},
    "method.dropout": {"uniform": [0.0, 0.2]},
    "train.batch_size": {"choice": [16, 32]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--resume", action="store_true", help="continue a study stopped by Ctrl-C")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tune"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    recipe = yaml.safe_load(recipe_path("quickstart").read_text())
    recipe["name"] = "qs-tune"
    recipe["output_dir"] = str(out)
    recipe["data"].update(
        max_train_examples=args.train, max_validation_examples=args.val, max_test_examples=args.test
    )
    recipe["train"].update(max_steps=args.steps, eval_every=max(1, args.steps // 3))
    recipe["merge"] = {"enabled": False}
    recipe["tune"] = {
        "trials": args.trials,
        "sampler": args.sampler,
        "metric": "accuracy",
        "pruner": "median",
        "space": SPACE,
    }
    path = out / "qs-tune.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    study = ftcli("tune", str(path), *(["--resume"] if args.resume else []))
    best = study["best"]
    print(f"study: {len(study['trials'])} trials, {study['sampler']}, median pruner")
    for t in study["trials"]:
        v = f"{t['value']:.4f}" if t["value"] is not None else "-"
        extra = f"pruned at step {t['pruned_at']}" if t["pruned_at"] is not None else ""
        print(f"  trial {t['number']:2d} {t['state']:8s} val acc {v} {extra} {t['params']}")
    defaults = recipe | {"name": "qs-defaults"}
    defaults.pop("tune")
    dpath = out / "qs-defaults.yaml"
    dpath.write_text(yaml.safe_dump(defaults, sort_keys=False))
    base = ftcli("train", str(dpath), "--force")
    rep = ftcli(
        "eval",
        best["run_dir"],
        "--baseline",
        str(out / "qs-defaults"),
        "--no-robustness",
        "--resamples",
        "999",
    )
    acc = next(s for s in rep["significance"] if s["metric"] == "accuracy")
    print(
        f"best trial {best['number']} {best['params']}: validation accuracy {best['value']:.4f}, "
        f"test accuracy {best['test']['metrics']['accuracy']:.4f}"
    )
    print(f"bundled defaults, same budget: test accuracy {base['eval']['metrics']['accuracy']:.4f}")
    print(
        f"paired (best vs defaults): diff {acc['diff']:+.4f} p={acc['p_value']:.3g} {acc['verdict']}"
    )
    (out / "summary.json").write_text(
        json.dumps({"study": study, "defaults": base["eval"], "paired": acc}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
