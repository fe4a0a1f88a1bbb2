"""Searching and repeating trainings: ``ftcli tune`` (an Optuna study, ``study``; what it prints and
writes, ``report``) and ``ftcli train --seeds`` / ``ftcli cv`` (``repeats``). The names below are
the package's public API, re-exported from those modules."""

from __future__ import annotations

from ftcli.tune.repeats import (
    CANONICAL_COLUMNS,
    canonical_columns,
    cross_validate,
    fold_indices,
    mean_std,
    pool,
    summarize,
    summary_table,
    train_seeds,
    variant,
)
from ftcli.tune.report import fmt, plots, print_table, render_html, trial_rows, write_tune_report
from ftcli.tune.study import (
    MAXIMIZE,
    _counts,
    enqueue_grid,
    finish,
    importances,
    last_val_loss,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    orphaned,
    run_trial,
    suggest,
    trial_recipe,
    tune,
    tune_dir,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "MAXIMIZE",
    "_counts",
    "canonical_columns",
    "cross_validate",
    "enqueue_grid",
    "finish",
    "fmt",
    "fold_indices",
    "importances",
    "last_val_loss",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "mean_std",
    "open_study",
    "orphaned",
    "plots",
    "pool",
    "print_table",
    "render_html",
    "run_trial",
    "suggest",
    "summarize",
    "summary_table",
    "train_seeds",
    "trial_recipe",
    "trial_rows",
    "tune",
    "tune_dir",
    "variant",
    "write_tune_report",
]
