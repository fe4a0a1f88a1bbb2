"""Training repeats: ``ftcli train RECIPE --seeds N`` and ``ftcli cv RECIPE --folds K``.

Seeds: only ``train.seed`` changes (1..N): the data split (``data.split.seed``) stays, so every run
is tested on the same sealed examples and the spread measures the training's own variance.

Cross-validation: the cleaned examples are split into K disjoint folds (stratified by label for
classification when every label has at least K examples), seeded by ``data.split.seed``. Fold k's
run reads the other folds as its data (the recipe's validation share is held out of them as usual)
and fold k as its ``data.test_path``; ``prepare`` also drops from training any example equal to a
test example.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import yaml

from ftcli.data.examples import CleanCounts, load_examples
from ftcli.errors import FtcliError
from ftcli.pipeline import train_run
from ftcli.recipe import Recipe, recipe_from_mapping
from ftcli.ui import UI
from ftcli.util import write_json, write_jsonl

# --------------------------------------------------------------------------- seeds


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
    keys = [
        k
        for k, v in per_run[0].items()
        if isinstance(v, int | float) and all(k in m for m in per_run)
    ]
    return {k: mean_std([m[k] for m in per_run]) for k in keys}


def summary_table(
    ui: UI, title: str, runs: list[dict], summary: dict[str, dict], run_label: str
) -> None:
    headers = ("metric", "mean ± std", *[f"{run_label} {r['label']}" for r in runs])
    rows = [
        (k, f"{s['mean']:.4f} ± {s['std']:.4f}", *[f"{r['metrics'][k]:.4f}" for r in runs])
        for k, s in summary.items()
        if k != "target_tokens"
    ]
    ui.table(title, rows, headers=headers)


def train_seeds(recipe: Recipe, n: int, ui: UI, resume: bool = False, force: bool = False) -> dict:

    runs = []
    for i in range(1, n + 1):
        r = variant(recipe, f"{recipe.name}-seed{i}", **{"train.seed": i})
        ui.step(f"seed {i}/{n}: {r.run_dir}")
        out = train_run(r, ui, resume=resume, force=force)
        runs.append(
            {"run": str(r.run_dir), "seed": i, "label": str(i), "metrics": out["eval"]["metrics"]}
        )
    summary = summarize([r["metrics"] for r in runs])
    summary_table(ui, f"{recipe.name}: test metrics over {n} seeds", runs, summary, "seed")
    path = Path(recipe.output_dir) / f"{recipe.name}-seeds" / "summary.json"
    result = {
        "name": recipe.name,
        "seeds": list(range(1, n + 1)),
        "runs": runs,
        "summary": summary,
        "summary_file": str(path),
    }
    write_json(path, result)
    ui.info(f"summary: {path}")
    return result


# --------------------------------------------------------------------------- cross-validation


CANONICAL_COLUMNS = (
    "text_column",
    "label_column",
    "prompt_column",
    "completion_column",
    "instruction_column",
    "input_column",
    "output_column",
    "messages_column",
    "system_prompt",
)


def fold_indices(examples: list[dict], k: int, seed: int, stratify: bool = True) -> list[list[int]]:
    """Test indices of each of the K folds: disjoint, together every example once."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if k < 2:
        raise FtcliError(f"--folds {k}: cross-validation needs at least 2 folds")
    if len(examples) < k:
        raise FtcliError(
            f"only {len(examples)} examples: too few for {k} folds", hint="use fewer folds"
        )
    labels = [e.get("label") for e in examples]
    counts = collections.Counter(labels)
    if stratify and labels[0] is not None and min(counts.values()) >= k:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            labels, labels
        )
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed).split(labels)
    return [sorted(test.tolist()) for _, test in splitter]


def canonical_columns(examples: list[dict]) -> dict:
    """Recipe data keys that read ftcli's canonical examples back (text/label, prompt/completion, messages)."""
    first = examples[0]
    cols: dict = {k: None for k in CANONICAL_COLUMNS}
    if "messages" in first:
        cols["messages_column"] = "messages"
    elif "prompt" in first:
        cols.update(prompt_column="prompt", completion_column="completion")
    else:
        cols["text_column"] = "text"
        if "label" in first:
            cols["label_column"] = "label"
    return cols


def pool(recipe: Recipe) -> list[dict]:
    """The recipe's examples after cleaning (and label filtering), before any split."""
    if recipe.data.test_path:
        raise FtcliError(
            "cross-validation makes its own test folds: remove data.test_path from the recipe"
        )
    if recipe.data.sources:
        raise FtcliError(
            "cross-validation of a mixture (data.sources) is not supported",
            hint="cross-validate one source at a time (data.path), or use `ftcli train` and "
            "`ftcli eval` (a per-source table on the sealed test split)",
        )
    examples = load_examples(recipe, recipe.data.path, CleanCounts())
    if recipe.task == "classification" and recipe.data.labels:
        examples = [e for e in examples if e["label"] in recipe.data.labels]
    return examples


def cross_validate(recipe: Recipe, k: int, ui: UI, force: bool = False) -> dict:

    if recipe.data.streaming:
        from ftcli.errors import RecipeError

        raise RecipeError(
            [
                recipe.problem(
                    "data.streaming",
                    "cross-validation puts every example in one of K folds; a stream is never "
                    "held whole",
                    "remove data.streaming for ftcli cv (--set data.streaming=false)",
                )
            ]
        )
    examples = pool(recipe)
    folds = fold_indices(examples, k, recipe.data.split.seed, recipe.data.split.stratify)
    root = Path(recipe.output_dir) / f"{recipe.name}-cv"
    cols = canonical_columns(examples)
    runs = []
    for i, test_idx in enumerate(folds, 1):
        held = set(test_idx)
        fold_dir = root / "folds" / f"fold{i}"
        write_jsonl(fold_dir / "train.jsonl", [e for j, e in enumerate(examples) if j not in held])
        write_jsonl(fold_dir / "test.jsonl", [examples[j] for j in test_idx])
        changes = {f"data.{c}": v for c, v in cols.items()}
        changes.update(
            {
                "data.path": str(fold_dir / "train.jsonl"),
                "data.test_path": str(fold_dir / "test.jsonl"),
                "data.format": "jsonl",
                "data.split.test": None,
                "data.subset": None,
                "data.max_test_examples": None,
                "merge.enabled": False,  # and its settings, which would then do nothing
                "merge.dtype": None,
                "merge.into": None,
            }
        )
        r = variant(recipe, f"{recipe.name}-fold{i}", **changes)
        ui.step(
            f"fold {i}/{k}: train on {len(examples) - len(held)}, test on {len(held)} -> {r.run_dir}"
        )
        out = train_run(r, ui, force=force)
        runs.append(
            {
                "run": str(r.run_dir),
                "fold": i,
                "label": str(i),
                "test_examples": len(held),
                "metrics": out["eval"]["metrics"],
            }
        )
    summary = summarize([r["metrics"] for r in runs])
    summary_table(
        ui, f"{recipe.name}: {k}-fold cross-validation (test metrics)", runs, summary, "fold"
    )
    result = {
        "name": recipe.name,
        "folds": k,
        "examples": len(examples),
        "runs": runs,
        "summary": summary,
        "summary_file": str(root / "summary.json"),
    }
    write_json(root / "summary.json", result)
    ui.info(f"summary: {root / 'summary.json'}")
    return result
