"""What a validation does: the validation loss, then one ``after_validation`` for everything that
follows from it (best so far, early stopping, the plateau scheduler, the metrics row, pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ftcli.forward import loss_sums
from ftcli.recipe import Recipe
from ftcli.testpoints import PAUSE, pause
from ftcli.util import append_jsonl


def evaluate_loss(accelerator, model, loader, task: str, objective=None) -> float:
    """Mean validation loss over all processes (token-weighted for causal LMs; per pair for
    ``objective``, a preference/reward run's)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                if objective is not None:
                    s, c, _ = objective.sums(model, batch)
                else:
                    s, c = loss_sums(model, batch, task)
            total += s.double()
            count += c.double()
            if PAUSE:
                pause("validation")
    total = accelerator.reduce(total, "sum")
    count = accelerator.reduce(count, "sum")
    if was_training:
        model.train()
    return (total / count).item() if count.item() else float("nan")


@dataclass(frozen=True)
class Pruning:
    """A study trial watching this run's validation curve (``ftcli tune``). A plain record that
    one ``if`` in the loop reads, not a callback: the loop stays one visible function. ``trial``
    is an ``optuna.Trial``; ``metric`` is what it is told at each validation."""

    trial: object
    metric: str = "validation_loss"  # or a classification metric: accuracy, macro_f1


def validation_score(model, features: list[dict], pad_id: int, batch_size: int, device, p: Pruning):
    """The pruning metric on the validation features (the test split is never read here)."""
    from ftcli.data.windows import by_document
    from ftcli.evaluation.metrics import classification_summary
    from ftcli.forward import class_probabilities

    features = by_document(features)  # windows of one document score as that document
    probs = class_probabilities(model, features, pad_id, batch_size, device)
    model.train()
    names = [str(i) for i in range(len(probs[0]))]
    return classification_summary([f["labels"] for f in features], probs, names)[p.metric]


def after_validation(
    v: float,
    *,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    state,
    recipe: Recipe,
    accelerator,
    model,
    scheduler,
    checkpointer,
    metrics_path: Path,
    progress,
    pruning: Pruning | None,
    val_feats: list[dict],
    pad_id: int,
) -> int | None:
    """What the validation loss ``v`` at ``step`` leads to, in order: a new best (early stopping
    keeps its weights) or one more validation without improvement (``patience`` of them stop the
    run: ``state.stopped_at``), the plateau scheduler's step, the metrics row, and the pruner's
    verdict. Returns the step the study's pruner stops the run at, else None."""
    early = recipe.train.early_stopping
    main = accelerator.is_main_process
    margin = early.min_delta if early else 0.0
    if state.best_val_loss is None or v < state.best_val_loss - margin:
        state.best_val_loss, state.best_val_step = v, step
        state.bad_validations = 0
        if early and main:
            checkpointer.save_best(step, v)
    elif early:
        state.bad_validations += 1
        if state.bad_validations >= early.patience:
            state.stopped_at = step
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(v)
    accelerator.log({"val_loss": v}, step=step)
    if main:
        append_jsonl(
            metrics_path,
            {"step": step, "epoch": round(step / steps_per_epoch, 4), "val_loss": v},
        )
    if progress:
        progress.note(f"step {step}/{total_steps}  validation loss {v:.4f}")
    if pruning is None:
        return None
    score = v
    if pruning.metric != "validation_loss":
        with accelerator.autocast():  # as training runs: flash-attention refuses float32
            score = validation_score(
                model, val_feats, pad_id, recipe.eval.batch_size, accelerator.device, pruning
            )
    pruning.trial.report(score, step)
    if step < total_steps and pruning.trial.should_prune():
        return step
    return None
