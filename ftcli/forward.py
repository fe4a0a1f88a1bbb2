"""The forward passes training, evaluation and serving share: the loss (the one shifted
cross-entropy, chunked so the full logits never exist), class probabilities, per-token losses and
bounded generation. A base module: it imports nothing from evaluation/ or train/.

Scoring batches are sorted by length so padding stays small; results come back in the caller's order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ftcli.data.rows import lengths_of, take
from ftcli.data.tokenize import IGNORE_INDEX, collate
from ftcli.data.windows import expand, mean_by_owner
from ftcli.models import pads_left


def length_batches(features: list[dict], batch_size: int):
    """Index groups of ``batch_size``, shortest examples first."""
    lengths = lengths_of(features)  # the length column when Arrow-backed: no row is decoded
    order = sorted(range(len(features)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


CE_CHUNK = 1024  # supervised positions per cross-entropy chunk: bounds the fp32 logits held
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def token_cross_entropy(logits, labels):
    """Cross-entropy of each next-token prediction, [batch, positions - 1], 0 where the label is
    ignored; and the mask of supervised positions. Logits are upcast to float32. Prompt and
    p-tuning prepend virtual tokens: their logits are dropped, the rest line up with ``labels``."""
    logits = logits[:, logits.shape[1] - labels.shape[1] :]
    shifted = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        shifted,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce, shifted != IGNORE_INDEX


def _lm_head(model):
    """(the transformers causal LM inside any peft / DDP / compile wrapping, its head's attribute
    name) when the head is the model's last operation, else None (then the plain path runs)."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    cfg = getattr(inner, "config", None)
    if head is None or any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in SCALED_LOGITS):
        return None
    name = next((n for n, m in inner.named_children() if m is head), None)
    return (inner, name) if name else None


def _chunk_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def supervised_cross_entropy(model, batch: dict, chunk: int = CE_CHUNK):
    """``token_cross_entropy`` computed only where the loss is: the LM head runs on the hidden
    states of supervised positions alone, in chunks (recomputed in backward), so the full
    [batch, positions, vocabulary] fp32 logits never exist. Same result as the plain path."""
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    found = _lm_head(model)
    # prompt-style peft methods prepend virtual tokens: positions no longer line up with labels,
    # so they take the plain path (token_cross_entropy drops the virtual tokens' logits)
    if found is None or getattr(
        getattr(model, "peft_config", {}).get("default"), "is_prompt_learning", False
    ):
        return token_cross_entropy(model(**inputs).logits, labels)
    inner, name = found
    head = getattr(inner, name)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    setattr(inner, name, torch.nn.Identity())
    try:  # through the model's own forward (peft, DDP hooks); logits_to_keep gathers the rows
        hidden = model(**inputs, logits_to_keep=keep).logits
    finally:
        setattr(inner, name, head)
    targets = labels[:, 1:][keep[:, :-1]]
    grad = torch.is_grad_enabled()
    parts = []
    for s in range(0, targets.numel(), chunk):
        h, y = hidden[s : s + chunk], targets[s : s + chunk]
        if grad:
            parts.append(
                torch.utils.checkpoint.checkpoint(_chunk_ce, head, h, y, use_reentrant=False)
            )
        else:
            parts.append(_chunk_ce(head, h, y))
    flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    ce = torch.zeros(keep[:, :-1].shape, dtype=flat.dtype, device=flat.device)
    ce = ce.masked_scatter(keep[:, :-1], flat)
    return ce, keep[:, :-1]


def loss_sums(model, batch: dict, task: str):
    """(summed loss, count) of a batch: per example for classification, per target token for LMs."""
    labels = batch["labels"]
    if task == "classification":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(out.logits.float(), labels, reduction="sum")
        return loss, torch.tensor(labels.numel(), device=labels.device)
    ce, mask = supervised_cross_entropy(model, batch)
    return ce.sum(), mask.sum()


def _forward(model, features: list[dict], idx: list[int], pad_id: int, device):
    batch = collate(take(features, idx), pad_id, pads_left(model))
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    return out.logits, batch["labels"].to(device)


def _token_ce(model, features: list[dict], idx: list[int], pad_id: int, device):
    batch = collate(take(features, idx), pad_id)
    return supervised_cross_entropy(model, {k: v.to(device) for k, v in batch.items()})


def inference_autocast(model, device):
    """On CUDA, autocast to the half type the model's weights hold (a base loaded in bf16 beside
    a float32 head or adapter; flash-attention refuses float32 inputs); elsewhere, and for an
    all-float32 model, nothing: scores stay float32."""
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    halves = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if not halves:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.bfloat16 in halves else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def class_probabilities(
    model, features: list[dict], pad_id: int, batch_size: int, device
) -> list[list[float]]:
    """Softmax probabilities per example, in the order of ``features``. A document-level feature
    with ``more_windows`` (data.long_documents: windows) gets the softmax of its windows' mean
    logits."""
    if any("more_windows" in f for f in features):
        flat, owner = expand(features)
        rows: list = [None] * len(flat)
        model.eval()
        with torch.no_grad():
            for idx in length_batches(flat, batch_size):
                logits, _ = _forward(model, flat, idx, pad_id, device)
                for r, i in enumerate(idx):
                    rows[i] = logits[r].float().cpu()
        mean = mean_by_owner(torch.stack(rows), owner, len(features))
        return torch.softmax(mean, dim=-1).tolist()
    probs: list = [None] * len(features)
    model.eval()
    with torch.no_grad(), inference_autocast(model, device):
        for idx in length_batches(features, batch_size):
            logits, _ = _forward(model, features, idx, pad_id, device)
            for i, row in zip(
                idx, torch.softmax(logits.float(), dim=-1).cpu().tolist(), strict=True
            ):
                probs[i] = row
    return probs


def token_losses(
    model, features: list[dict], pad_id: int, batch_size: int, device
) -> list[tuple[float, int]]:
    """(summed loss, number of target tokens) per example, in the order of ``features``."""
    rows: list = [None] * len(features)
    model.eval()
    with torch.no_grad(), inference_autocast(model, device):
        for idx in length_batches(features, batch_size):
            ce, mask = _token_ce(model, features, idx, pad_id, device)
            sums, counts = ce.sum(dim=1).cpu().tolist(), mask.sum(dim=1).cpu().tolist()
            for i, s, c in zip(idx, sums, counts, strict=True):
                rows[i] = (s, c)
    return rows


def token_logprobs(
    model, features: list[dict], pad_id: int, batch_size: int, device
) -> list[list[float]]:
    """Log-probability of every target token of each example, in the order of ``features``."""
    out: list = [None] * len(features)
    model.eval()
    with torch.no_grad(), inference_autocast(model, device):
        for idx in length_batches(features, batch_size):
            ce, mask = _token_ce(model, features, idx, pad_id, device)
            for r, i in enumerate(idx):
                out[i] = (-ce[r][mask[r]]).cpu().tolist()
    return out


def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    add_special_tokens: bool,
    max_new_tokens: int,
    batch_size: int,
    device,
    max_prompt_tokens: int,
    temperature: float = 0.0,
    keep_ids: bool = False,
) -> list[dict]:
    """One answer per prompt: {"answer", "stopped" (ended with EOS), "tokens" (answer length)};
    greedy unless a temperature is given, batched with left padding. ``keep_ids`` adds the token
    ids read and written ("prompt_ids", "ids"), for scoring the answers as they were generated.

    Prompts longer than ``max_prompt_tokens`` keep their end (where the answer starts); an empty
    prompt starts from the BOS (or EOS) token, so the model always has something to continue.
    """
    eos = tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    encoded = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if p else []
        ids = ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids
        encoded.append(ids or [start])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    kwargs: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": eos}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    else:  # greedy: drop sampling settings a generation_config may carry
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list = [None] * len(prompts)
    model.eval()
    with torch.no_grad(), inference_autocast(model, device):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation begins
                k = len(encoded[i])
                ids[r, width - k :] = torch.tensor(encoded[i])
                mask[r, width - k :] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(idx):
                new = gen[r, width:].tolist()
                stopped = eos in new
                answer = new[: new.index(eos)] if stopped else new
                out[i] = {
                    "answer": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "stopped": stopped,
                    "tokens": len(answer),
                }
                if keep_ids:
                    out[i].update(prompt_ids=list(encoded[i]), ids=answer)
    return out
