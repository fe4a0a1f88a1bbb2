"""Mixtures (``data.sources``): how many training examples each source gives, and which.

Weights are relative shares of the training split, whose size is ``data.max_train_examples``
or else the sum of the sources' training pools; each source's count is its exact share (largest
remainders), drawn from its pool with the split seed, repeating the pool whole where the share is
larger than the pool (a small source weighted up). Without weights every source gives its whole
pool, capped by its ``max_examples``. Validation and test keep every source's held-out examples.
"""

from __future__ import annotations

import random

import numpy as np


def shares(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights``: floors, then the largest remainders get one
    more (ties to the earlier source), so the counts sum to ``total`` exactly."""
    w = np.asarray(weights, dtype=float)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    left = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts.tolist()


def draw(idx: np.ndarray, count: int, seed: str) -> tuple[np.ndarray, int]:
    """``count`` of ``idx`` (row indices): whole passes over it, then a seeded sample without
    replacement for the rest, in pool order; and how many rows are repeats."""
    n = len(idx)
    if count <= 0 or not n:
        return idx[:0], 0
    full, rest = divmod(count, n)
    part = sorted(random.Random(seed).sample(range(n), rest))
    out = np.concatenate([np.tile(idx, full), idx[part]]) if full else idx[part]
    return out, max(0, count - n)


def train_rows(
    pools: list[np.ndarray],
    weights: list[float | None],
    caps: list[int | None],
    total: int | None,
    seed: int,
) -> tuple[list[np.ndarray], list[int]]:
    """Each source's training rows and repeats: by weight (every weight set) or capped by
    ``max_examples`` (none set; ``total`` is then the caller's overall cap)."""
    if weights and all(w is not None for w in weights):
        size = total if total is not None else sum(len(p) for p in pools)
        out = [
            draw(p, c, f"{seed}:mixture:{j}")
            for j, (p, c) in enumerate(zip(pools, shares(weights, size), strict=True))
        ]
        return [rows for rows, _ in out], [r for _, r in out]
    rows = []
    for j, (p, cap) in enumerate(zip(pools, caps, strict=True)):
        if cap is not None and len(p) > cap:
            keep = sorted(random.Random(f"{seed}:mixture:{j}").sample(range(len(p)), cap))
            p = p[keep]
        rows.append(p)
    return rows, [0] * len(pools)


def interleave(parts: list[np.ndarray], seed: int) -> np.ndarray:
    """The sources' training rows as one split, in a seeded shuffled order (not source by
    source: a file read in order, or a sampler that does not shuffle, still sees the mixture)."""
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    order = list(range(len(rows)))
    random.Random(f"{seed}:mixture").shuffle(order)
    return rows[order]
