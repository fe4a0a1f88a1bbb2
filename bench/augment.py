"""Does data.augment help in a low-data case? Rotten Tomatoes on MiniLM-L6 (the bundled
quickstart recipe with overrides): N training reviews with and without augmentation, several seeds each, compared
on the same sealed test split with ``ftcli eval AUG_RUN --baseline PLAIN_RUN`` (paired: McNemar
on accuracy, per seed), and reported as mean ± std over seeds with each seed's verdict.

    python bench/augment.py                                    # 200 and 800 reviews, 3 seeds
    python bench/augment.py --sizes 200 --seeds 1 --test 300   # a quick look

The two sides of a seed run one after the other (plain, then augmented; the order alternates
with the seed) so that load from other jobs hits both alike. Everything else is the quickstart:
LoRA r=8 on query/value, lr 2e-3, batch 32, max 64 tokens; ``--epochs`` passes over the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ftcli import ROOT, ftcli  # noqa: E402

sys.path.insert(0, str(ROOT))
from ftcli.tune import repeats  # noqa: E402


def mean_std(xs: list[float]) -> str:
    s = repeats.mean_std(xs)  # the same sample statistics as `--seeds`
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1, help="run seeds FIRST..SEEDS only")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--ops", default="synonym,swap,delete,insert,typo")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--test", type=int, default=600, help="sealed test reviews (same for all)")
    ap.add_argument("--val", type=int, default=200, help="validation reviews (loss only)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-augment"))
    ap.add_argument("--resamples", type=int, default=999)
    args = ap.parse_args()

    results = []
    for seed in range(
        args.first_seed, args.seeds + 1
    ):  # seed-major: a cut-short run still covers every size
        for n in args.sizes:
            common = [
                "--set", f"output_dir={args.out}",
                "--set", f"data.max_train_examples={n}",
                "--set", f"data.max_test_examples={args.test}",
                "--set", f"data.max_validation_examples={args.val}",
                "--set", f"train.epochs={args.epochs}",
                "--set", f"train.seed={seed}",
                "--set", "train.eval_every=1000000",
                "--set", "merge.enabled=false",
                "--force",
            ]  # fmt: skip
            aug = [
                "--set", f"data.augment.copies={args.copies}",
                "--set", f"data.augment.ops=[{args.ops}]",
                "--set", f"data.augment.p={args.p}",
                "--set", f"data.augment.seed={seed}",
            ]  # fmt: skip
            sides = {
                "plain": ["--set", f"name=aug{n}-plain-s{seed}", *common],
                "augmented": ["--set", f"name=aug{n}-aug-s{seed}", *common, *aug],
            }
            order = list(sides) if seed % 2 else list(sides)[::-1]
            runs = {}
            for side in order:
                runs[side] = ftcli("train", "quickstart", *sides[side])
                print(
                    f"n={n} seed={seed} {side:9s} train={runs[side]['data']['sizes']['train']} "
                    f"test acc={runs[side]['eval']['metrics']['accuracy']:.4f} "
                    f"train {runs[side]['timings_s']['train']:.0f}s",
                    flush=True,
                )
            rep = ftcli(
                "eval",
                f"{args.out}/aug{n}-aug-s{seed}",
                "--baseline",
                f"{args.out}/aug{n}-plain-s{seed}",
                "--no-robustness",
                "--resamples",
                str(args.resamples),
            )
            acc = next(s for s in rep["significance"] if s["metric"] == "accuracy")
            results.append(
                {
                    "n": n,
                    "seed": seed,
                    "plain": runs["plain"]["eval"]["metrics"]["accuracy"],
                    "augmented": runs["augmented"]["eval"]["metrics"]["accuracy"],
                    "diff": acc["diff"],
                    "p": acc.get("p_value"),
                    "verdict": acc["verdict"],
                    "added": runs["augmented"]["data"]["augmented"]["added"],
                }
            )
            r = results[-1]
            print(
                f"n={n} seed={seed} paired: diff {r['diff']:+.4f} p={r['p']:.3g} {r['verdict']}",
                flush=True,
            )
    print("\nsize | plain accuracy | augmented accuracy | paired verdicts (aug vs plain)")
    for n in args.sizes:
        rs = [r for r in results if r["n"] == n]
        verdicts = ", ".join(f"s{r['seed']}: {r['diff']:+.4f} {r['verdict']}" for r in rs)
        print(
            f"{n} | {mean_std([r['plain'] for r in rs])} | "
            f"{mean_std([r['augmented'] for r in rs])} | {verdicts}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
