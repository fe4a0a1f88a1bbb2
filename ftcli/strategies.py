"""Where each trainable parameter sits in the network, and what follows from it: the learning rate
by method, LoRA+ and layer-wise learning-rate groups, and the gradual-unfreezing schedule.

A parameter belongs to a transformer block (``...layers.3...``, ``...layer.3...``, ``...h.3...``),
to the embeddings (the bottom), or to the rest: the task head, the final norm, a pooler (the top).
The unfreezing schedule is a pure function of the optimizer step, so ``--resume`` lands exactly
where the uninterrupted run would be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftcli.recipe import PROMPT_KINDS, Recipe

# The learning rate a method gets when the recipe sets none. LoRA/full keep ftcli's 2e-4.
# Prompt-style methods need far higher rates (peft's comparison on Llama-3.2-3B: prefix tuning
# 41.6 at lr 5e-3 vs 18.6 at 1e-3). IA3 and VeRA train vectors of scales: measured with
# bench/strategies.py (MiniLM-L6, Rotten Tomatoes, 100 steps x 32), at 3e-3 both stayed at the
# majority class (0.578); at 3e-2 IA3 reached 0.766 (LoRA r=8 at 2e-3: 0.760) and VeRA 0.696.
DEFAULT_LR = {
    "full": 2e-4,
    "lora": 2e-4,
    "qlora": 2e-4,
    "ia3": 3e-2,
    "vera": 3e-2,
    "prefix": 5e-3,
    "prompt": 5e-3,
    "ptuning": 5e-3,
}

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBED = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


def learning_rate(recipe: Recipe) -> tuple[float, str]:
    """(lr, where it came from): the recipe's, else the method's default."""
    o = recipe.train.optimizer
    if "lr" in o.model_fields_set:
        return o.lr, "train.optimizer.lr"
    return DEFAULT_LR[recipe.method.kind], f"the default for method.kind {recipe.method.kind}"


def block_of(name: str) -> int | None:
    """The transformer block a parameter belongs to, or None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    return block_of(name) is None and any(e in name for e in _EMBED)


def num_blocks(config) -> int | None:
    """How many transformer blocks a model config declares."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, key, None)
        if isinstance(n, int):
            return n
    text = getattr(config, "text_config", None)
    return num_blocks(text) if text is not None else None


def depth_from_top(name: str, n_blocks: int) -> int:
    """0 for the head and everything above the blocks, i for block n-1-i, n-1 for embeddings."""
    b = block_of(name)
    if b is not None:
        return n_blocks - 1 - b
    return max(0, n_blocks - 1) if is_embedding(name) else 0


def is_lora_b(name: str) -> bool:
    return "lora_B" in name or "lora_embedding_B" in name


def param_groups(recipe: Recipe, model, n_blocks: int | None) -> list[dict]:
    """Optimizer groups: weight decay on matrices only, LoRA+ (B gets ``ratio`` x lr) and layer
    decay (block i from the top gets lr * decay**i). Each group has its own ``lr``."""
    o = recipe.train.optimizer
    lr, _ = learning_rate(recipe)
    ratio = o.lora_plus_ratio or 1.0
    decay = o.layer_decay
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = ratio if is_lora_b(name) else 1.0
        depth = depth_from_top(name, n_blocks or 1) if decay is not None else 0
        if decay is not None:
            scale *= decay**depth
        wd = o.weight_decay if p.ndim >= 2 else 0.0
        key = (wd, scale, depth, is_lora_b(name))
        g = groups.setdefault(key, {"params": [], "weight_decay": wd, "lr": lr * scale})
        g["params"].append(p)
    # the groups at the recipe's own rate first: metrics.jsonl logs the first group's lr
    return sorted(groups.values(), key=lambda g: g["lr"] != lr)


@dataclass(frozen=True)
class Unfreezing:
    """Gradual unfreezing: which trainable parameters wait, and for which block each waits."""

    blocks: tuple[int, ...]  # the adapted/trained blocks, top first
    waiting: dict  # parameter name -> the block whose turn unfreezes it
    start: int
    every: int

    def open_blocks(self, step: int) -> int:
        """How many blocks (top first) are trainable at optimizer step ``step``: a pure function."""
        return min(len(self.blocks), self.start + step // self.every)

    def apply(self, model, step: int) -> int:
        """Set requires_grad for ``step``; returns the trainable parameter count."""
        opened = set(self.blocks[: self.open_blocks(step)])
        n = 0
        for name, p in model.named_parameters():
            if name in self.waiting:
                p.requires_grad_(self.waiting[name] in opened)
            if p.requires_grad:
                n += p.numel()
        return n


def unfreezing(recipe: Recipe, model) -> Unfreezing | None:
    """The schedule over the parameters training would otherwise train all at once. Embeddings
    unfreeze with the bottom block; the head and everything outside the blocks train from the start."""
    u = recipe.train.unfreeze
    if u is None or recipe.method.kind in PROMPT_KINDS:
        return None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    found = {b for n in trainable if (b := block_of(n)) is not None}
    blocks = tuple(sorted(found, reverse=True))
    bottom = blocks[-1] if blocks else None
    waiting = {}
    for n in trainable:
        b = block_of(n)
        if b is not None:
            waiting[n] = b
        elif is_embedding(n) and bottom is not None:
            waiting[n] = bottom
    return Unfreezing(blocks, waiting, u.start_layers, u.every_steps)
