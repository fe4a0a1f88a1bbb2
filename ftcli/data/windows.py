"""``data.long_documents: windows`` (classification): a text longer than ``max_length`` is read
whole, as overlapping windows of ``max_length`` tokens, instead of being cut.

Training: every window is an example with its document's label and a ``doc`` index. Evaluation,
``ftcli predict`` and serve: one prediction per document, from the mean of its windows' logits.
(The mean of the windows' log-probabilities gives the same distribution after the softmax: the
two differ by one constant per document. Averaging probabilities would not: it lets one confident
window outvote the rest less than the evidence does.) Metrics count documents, not windows.

The windows come from the fast tokenizer's own overflow support, so the special tokens ([CLS] ...
[SEP] for encoders) are in every window; consecutive windows share ``overlap(max_length)`` tokens.
"""

from __future__ import annotations

from ftcli.errors import FtcliError


def overlap(max_length: int) -> int:
    """Tokens two consecutive windows share: a quarter of the window (fixed, documented), so a
    sentence cut at one window's end is read whole at the next one's start."""
    return max_length // 4


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[dict, list[int]]:
    """The windows of ``texts`` (input_ids, attention_mask per window) and, for each window, the
    index of the text it came from."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtcliError(
            "data.long_documents: windows needs a fast tokenizer (its overflow support cuts the "
            f"windows); {type(tokenizer).__name__} is not one",
            hint="use a model with a tokenizer.json, or data.long_documents: truncate",
        )
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length - specials <= overlap(max_length):
        raise FtcliError(
            f"data.max_length {max_length} leaves no room for windows after "
            f"{specials} special tokens and an overlap of {overlap(max_length)}",
            hint="raise data.max_length",
        )
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        stride=overlap(max_length),
        return_overflowing_tokens=True,
        add_special_tokens=True,
    )
    return enc, list(enc["overflow_to_sample_mapping"])


def by_document(features: list[dict]) -> list[dict]:
    """One feature per document: its first window (so a one-window document is exactly its
    truncated feature), the later windows' input_ids under ``more_windows``. Features without a
    ``doc`` index (truncate) come back as they are."""
    if not features or "doc" not in features[0]:
        return features
    out: list[dict] = []
    at: dict[int, int] = {}
    for f in features:
        d = f["doc"]
        if d in at:
            out[at[d]].setdefault("more_windows", []).append(f["input_ids"])
        else:
            at[d] = len(out)
            out.append({k: v for k, v in f.items() if k != "doc"})
    return out


def expand(features: list[dict]) -> tuple[list[dict], list[int]]:
    """Every window of document-level features as its own feature, and the index of the document
    each came from (the inverse of ``by_document``)."""
    flat, owner = [], []
    for i, f in enumerate(features):
        flat.append(f)
        owner.append(i)
        for ids in f.get("more_windows", ()):
            flat.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": f["labels"]})
            owner.append(i)
    return flat, owner


def mean_by_owner(rows, owner: list[int], n: int):
    """The mean of ``rows`` (a [windows, classes] tensor) per document: [n, classes]."""
    import torch

    idx = torch.tensor(owner, dtype=torch.long, device=rows.device)
    sums = torch.zeros((n, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    sums.index_add_(0, idx, rows)
    counts = torch.bincount(idx, minlength=n).to(rows.dtype).unsqueeze(1)
    return sums / counts
