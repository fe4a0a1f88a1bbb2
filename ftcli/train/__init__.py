"""Training: ``loop`` (``train()``, the one visible loop over ``accelerate.Accelerator``, with its
``LoopState`` and ``log_row``), ``batching`` (length-grouped batch plans, loaders, collation),
``optim`` (optimizer and schedule), ``checkpoints`` (``Checkpointer``: resume, best, sharded) and
``validation`` (validation loss; early stopping, plateau and pruning in ``after_validation``).
"""

from __future__ import annotations

from ftcli.train.batching import (
    MEGA_BATCHES,
    batch_cost,
    batch_plan,
    epoch_order,
    make_loader,
    optimizer_steps,
    targets_in,
)
from ftcli.train.checkpoints import (
    BEST,
    Checkpointer,
    latest_checkpoint,
    load_checkpoint,
    restore_best,
    save_best,
    save_checkpoint,
    save_sharded_checkpoint,
    save_trained,
    trainable_state,
)
from ftcli.train.loop import (
    LogWindow,
    LoopState,
    Trained,
    log_row,
    loss_trouble,
    speed_up,
    stopped,
    train,
)
from ftcli.train.optim import build_optimizer, build_scheduler
from ftcli.train.validation import Pruning, after_validation, evaluate_loss, validation_score

__all__ = [
    "BEST",
    "MEGA_BATCHES",
    "Checkpointer",
    "LogWindow",
    "LoopState",
    "Pruning",
    "Trained",
    "after_validation",
    "batch_cost",
    "batch_plan",
    "build_optimizer",
    "build_scheduler",
    "epoch_order",
    "evaluate_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "log_row",
    "loss_trouble",
    "make_loader",
    "optimizer_steps",
    "restore_best",
    "save_best",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "save_trained",
    "speed_up",
    "stopped",
    "targets_in",
    "train",
    "trainable_state",
    "validation_score",
]
