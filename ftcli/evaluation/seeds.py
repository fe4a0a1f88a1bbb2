"""``ftcli train RECIPE --seeds N``: the same run with N seeds, and its test metrics as mean ± std.

Only ``train.seed`` changes (1..N): the data split (``data.split.seed``) stays, so every run is
tested on the same sealed examples and the spread measures the training's own variance.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from ftcli.recipe import Recipe, recipe_from_mapping
from ftcli.ui import UI


def variant(recipe: Recipe, name: str, **changes) -> Recipe:
    """A validated copy of ``recipe`` with a new name and some keys changed (dotted keys allowed)."""
    data = yaml.safe_load(recipe.to_yaml())
    data["name"] = name
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return recipe_from_mapping(data, file=f"<{name}>")


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": vals}


def summarize(per_run: list[dict]) -> dict[str, dict]:
    """metric -> mean/std over runs, for every numeric metric all runs report."""
    keys = [k for k, v in per_run[0].items() if isinstance(v, int | float) and all(k in m for m in per_run)]
    return {k: mean_std([m[k] for m in per_run]) for k in keys}


def summary_table(ui: UI, title: str, runs: list[dict], summary: dict[str, dict], run_label: str) -> None:
    headers = ("metric", "mean ± std", *[f"{run_label} {r['label']}" for r in runs])
    rows = [(k, f"{s['mean']:.4f} ± {s['std']:.4f}", *[f"{r['metrics'][k]:.4f}" for r in runs])
            for k, s in summary.items() if k != "target_tokens"]
    ui.table(title, rows, headers=headers)


def train_seeds(recipe: Recipe, n: int, ui: UI, resume: bool = False, force: bool = False) -> dict:
    from ftcli.run import train_run
    from ftcli.util import write_json

    runs = []
    for i in range(1, n + 1):
        r = variant(recipe, f"{recipe.name}-seed{i}", **{"train.seed": i})
        ui.step(f"seed {i}/{n}: {r.run_dir}")
        out = train_run(r, ui, resume=resume, force=force)
        runs.append({"run": str(r.run_dir), "seed": i, "label": str(i), "metrics": out["eval"]["metrics"]})
    summary = summarize([r["metrics"] for r in runs])
    summary_table(ui, f"{recipe.name}: test metrics over {n} seeds", runs, summary, "seed")
    path = Path(recipe.output_dir) / f"{recipe.name}-seeds" / "summary.json"
    result = {"name": recipe.name, "seeds": list(range(1, n + 1)), "runs": runs, "summary": summary,
              "summary_file": str(path)}
    write_json(path, result)
    ui.info(f"summary: {path}")
    return result
