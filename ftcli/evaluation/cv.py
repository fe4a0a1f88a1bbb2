"""``ftcli cv RECIPE --folds K``: K runs, each tested on one fold of the data that it never saw.

The cleaned examples are split into K disjoint folds (stratified by label for classification when
every label has at least K examples), seeded by ``data.split.seed``. Fold k's run reads the other
folds as its data (the recipe's validation share is held out of them as usual) and fold k as its
``data.test_path``; ``prepare`` also drops from training any example equal to a test example.
"""

from __future__ import annotations

import collections
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.evaluation.seeds import summarize, summary_table, variant
from ftcli.recipe import Recipe
from ftcli.ui import UI

CANONICAL_COLUMNS = ("text_column", "label_column", "prompt_column", "completion_column", "instruction_column",
                     "input_column", "output_column", "messages_column", "system_prompt")


def fold_indices(examples: list[dict], k: int, seed: int, stratify: bool = True) -> list[list[int]]:
    """Test indices of each of the K folds: disjoint, together every example once."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if k < 2:
        raise FtcliError(f"--folds {k}: cross-validation needs at least 2 folds")
    if len(examples) < k:
        raise FtcliError(f"only {len(examples)} examples: too few for {k} folds", hint="use fewer folds")
    labels = [e.get("label") for e in examples]
    counts = collections.Counter(labels)
    if stratify and labels[0] is not None and min(counts.values()) >= k:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)
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
    from ftcli.data import CleanCounts, load_examples

    if recipe.data.test_path:
        raise FtcliError("cross-validation makes its own test folds: remove data.test_path from the recipe")
    examples = load_examples(recipe, recipe.data.path, CleanCounts())
    if recipe.task == "classification" and recipe.data.labels:
        examples = [e for e in examples if e["label"] in recipe.data.labels]
    return examples


def cross_validate(recipe: Recipe, k: int, ui: UI, force: bool = False) -> dict:
    from ftcli.run import train_run
    from ftcli.util import write_json, write_jsonl

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
        changes.update({"data.path": str(fold_dir / "train.jsonl"), "data.test_path": str(fold_dir / "test.jsonl"),
                        "data.format": "jsonl", "data.split.test": None, "data.subset": None,
                        "data.max_test_examples": None, "merge.enabled": False})
        r = variant(recipe, f"{recipe.name}-fold{i}", **changes)
        ui.step(f"fold {i}/{k}: train on {len(examples) - len(held)}, test on {len(held)} -> {r.run_dir}")
        out = train_run(r, ui, force=force)
        runs.append({"run": str(r.run_dir), "fold": i, "label": str(i), "test_examples": len(held),
                     "metrics": out["eval"]["metrics"]})
    summary = summarize([r["metrics"] for r in runs])
    summary_table(ui, f"{recipe.name}: {k}-fold cross-validation (test metrics)", runs, summary, "fold")
    result = {"name": recipe.name, "folds": k, "examples": len(examples), "runs": runs, "summary": summary,
              "summary_file": str(root / "summary.json")}
    write_json(root / "summary.json", result)
    ui.info(f"summary: {root / 'summary.json'}")
    return result
