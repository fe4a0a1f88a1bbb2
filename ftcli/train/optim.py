"""The optimizer (its parameter groups: weight decay, LoRA+, per-block learning rates) and the
learning-rate schedule a recipe asks for.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from ftcli.errors import FtcliError
from ftcli.recipe import Recipe
from ftcli.strategies import learning_rate, num_blocks, param_groups


def fused_adamw(device) -> bool | None:
    """AdamW's one-kernel-for-all-parameters form where it pays: CUDA. Elsewhere None, torch's
    default (foreach): its CPU fused kernel exists but was never measured faster here."""
    return True if torch.device(device).type == "cuda" else None


def build_optimizer(recipe: Recipe, model, device=None):
    """The optimizer over every trainable parameter, in groups with their own lr (weight decay on
    matrices only; LoRA+ and layer_decay: ftcli.strategies.param_groups). ``device``: where the
    parameters train (default: where the first trainable one is; build after placing the model,
    ftcli.distributed.place, or pass it for a sharded launch whose shards are placed later)."""
    o = recipe.train.optimizer
    if not any(p.requires_grad for p in model.parameters()):
        raise FtcliError(
            "the model has no trainable parameters",
            hint="check method.kind and method.target_modules",
        )
    config = getattr(model, "config", None)
    groups = param_groups(recipe, model, num_blocks(config) if config is not None else None)
    lr, _ = learning_rate(recipe)
    name = o.name
    if name in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        }[name]
        return cls(groups, lr=lr, betas=o.betas, eps=o.eps)
    if name == "adamw":
        where = device or next(p for p in model.parameters() if p.requires_grad).device
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps, fused=fused_adamw(where))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=o.betas, eps=o.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=o.momentum, eps=o.eps)
    raise AssertionError(name)  # the schema admits nothing else


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    s = recipe.train.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=s.factor, patience=s.patience
        )
    warmup = (
        s.warmup_steps if s.warmup_steps is not None else math.ceil(s.warmup_ratio * total_steps)
    )
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[s.name]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
