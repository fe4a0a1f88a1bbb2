"""What the loop feeds the model: length-grouped batch plans that are a pure function of (seed,
epoch) so ``--resume`` replays them, the loaders over them, and the collate function (padded rows,
or packed rows for varlen attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader

from ftcli.data.rows import Reordered
from ftcli.data.tokenize import IGNORE_INDEX, collate, pack, padded_width
from ftcli.recipe import TrainSpec


def make_loader(
    features: Sequence[dict],
    batch_size: int,
    pad_id: int,
    order: list[int] | None = None,
    batches: list[list[int]] | None = None,
    collate_fn=None,
):
    """A loader over ``features``: in ``order`` by ``batch_size``, or exactly the index ``batches``.
    Rows are read only when a batch is fetched (a rank reads only its own batches)."""
    data = Reordered(features, order) if order is not None else features
    by = {"batch_sampler": batches} if batches is not None else {"batch_size": batch_size}
    # An explicit generator: starting an iterator must not draw from the global RNG, or a resumed
    # run's dropout masks would drift from the uninterrupted run's.
    return DataLoader(
        data,
        shuffle=False,
        collate_fn=collate_fn or (lambda b: collate(b, pad_id)),
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),
        **by,
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


MEGA_BATCHES = 50  # length grouping sorts within windows of this many batches


def batch_plan(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group: bool = True,
    batch_tokens: int | None = None,
    packed: bool = False,
) -> list[list[int]]:
    """The micro-batches (example indices) of epoch ``epoch``, a pure function of its arguments so
    ``--resume`` replays them exactly. Every example appears once per epoch.

    ``group``: the epoch's shuffled order cut into windows of ~50 batches, each sorted by length
    (long first) and cut into batches, then the batch order shuffled with the heaviest batch first:
    batches of similar lengths, little padding. ``batch_tokens``: a micro-batch takes examples
    while the tokens the model runs on (packed: their sum; padded: count x longest, rounded up to
    PAD_MULTIPLE) stay within the budget.
    """
    order = epoch_order(len(lengths), seed, epoch)
    if not group and batch_tokens is None:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    window = batch_size * MEGA_BATCHES
    if batch_tokens is not None:
        window = max(window, MEGA_BATCHES * batch_tokens // max(1, max(lengths)))
    batches: list[list[int]] = []
    for s in range(0, len(order), window):
        part = order[s : s + window]
        if group:
            part = sorted(part, key=lambda i: -lengths[i])
        if batch_tokens is None:
            batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
            continue
        cur: list[int] = []
        longest = used = 0
        for i in part:
            k = lengths[i]
            cost = used + k if packed else (len(cur) + 1) * padded_width(max(longest, k))
            if cur and cost > batch_tokens:
                batches.append(cur)
                cur, longest, used = [], 0, 0
            cur.append(i)
            longest, used = max(longest, k), used + k
        if cur:
            batches.append(cur)
    if group:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        # the heaviest batch first: the allocator's largest blocks are taken at step 1 and reused,
        # instead of a late long batch growing a heap that smaller shapes have fragmented (peak
        # RSS on CPU, reserved memory on CUDA), and an out-of-memory shows at step 1, not hours in
        heaviest = max(range(len(batches)), key=lambda b: batch_cost(batches[b], lengths, packed))
        batches.insert(0, batches.pop(heaviest))
    return batches


def batch_cost(rows: list[int], lengths: list[int], packed: bool) -> int:
    """The tokens the model runs on for a micro-batch: their sum packed, count x padded longest."""
    if packed:
        return sum(lengths[i] for i in rows)
    return len(rows) * padded_width(max(lengths[i] for i in rows))


def epoch_batches(t: TrainSpec, *, lengths: list[int], epoch: int, packed: bool) -> list[list[int]]:
    """``batch_plan`` under the recipe's train settings: the micro-batches of epoch ``epoch``."""
    return batch_plan(
        lengths, t.batch_size, t.seed, epoch, t.group_by_length, t.batch_tokens, packed
    )


def _collate(batch: list[dict], *, pad_id: int, left: bool, packed: bool, path: str, dtype):
    if not packed:
        return collate(batch, pad_id, left)
    return pack(batch, pad_id, None, path == VARLEN, mask_dtype=dtype, mask=path == MASK)


def collator(*, pad_id: int, left: bool, packed: bool = False, path: str = "mask", dtype=None):
    """The loaders' collate function: rows padded on the model's side (``left``), or packed the
    ``path`` way (``packing_path``; ``dtype``: the 4D mask's, the compute dtype)."""
    return partial(_collate, pad_id=pad_id, left=left, packed=packed, path=path, dtype=dtype)


VARLEN, FLEX, MASK = "varlen", "flex", "mask"  # packing_path's answers


def packing_path(device_type: str, attn_implementation: str, flash_attn: bool, flex: bool) -> str:
    """How packed examples are kept apart, the fastest way available: flash-attention's varlen
    kernel (one row, no mask: it reads the boundaries from the position ids) when the model runs
    flash-attention and the package imports; else, on CUDA, flex_attention (rows, no mask: its
    block mask comes from the position ids); else a 4D additive mask in the compute dtype
    (eager/SDPA, any device)."""
    if str(attn_implementation).startswith("flash_attention") and flash_attn:
        return VARLEN
    if device_type == "cuda" and flex:
        return FLEX
    return MASK


def choose_packing(model, device) -> str:
    """``packing_path`` for this model on ``device``, what is installed decides."""
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    attn = str(getattr(model.config, "_attn_implementation", ""))
    flex = is_torch_flex_attn_available() and getattr(model, "_supports_flex_attn", False)
    return packing_path(torch.device(device).type, attn, is_flash_attn_2_available(), flex)


def compute_dtype(model, mixed_precision: str):
    """The dtype the attention computes in: autocast's under bf16/fp16 mixed precision, else the
    input embeddings' (the hidden states take it)."""
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def targets_in(batch: dict, task: str):
    """What the loss averages over in a micro-batch: examples, or supervised next-token positions."""
    labels = batch["labels"]
    if task == "classification":  # a fill on the device: torch.tensor(n, device=) copies, synced
        return torch.full((), labels.shape[0], device=labels.device, dtype=torch.long)
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def optimizer_steps(loader, k: int):
    """The loader's micro-batches in groups of ``k`` (the last may be shorter): one optimizer step each."""
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group
