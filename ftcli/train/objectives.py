"""Preference and reward objectives: pair collate, sequence log-probs, and the losses from their
papers (DPO, IPO, SimPO, ORPO, KTO, and Bradley-Terry for reward models).

A pair micro-batch stacks its chosen rows then its rejected rows into one right-padded batch of
2B rows, so the policy runs ONE forward per micro-batch. Log-probs are summed over the answer
tokens only (labels != -100), in float32, through the chunked head of ``forward.py`` (the full
logits never exist). Every loss returns (per-example losses, metrics of per-example tensors): the
loop averages the losses over the step's pairs as it averages classification losses over the
step's examples. docs/preference.md states each formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftcli.data.tokenize import IGNORE_INDEX, collate
from ftcli.forward import supervised_cross_entropy

PAIR_TASKS = ("preference", "reward")

# The pair statistics the loop tallies per micro-batch (sums, read once per log window):
# pairs, correctly ranked pairs, summed margins, chosen/rejected summed log-probs (rewards for
# a reward model) and their counts, and the policy-reference log-ratio on chosen answers.
STATS = (
    "pairs",
    "correct",
    "margin",
    "chosen",
    "chosen_n",
    "rejected",
    "rejected_n",
    "kl",
    "kl_n",
)


# --------------------------------------------------------------------------- features and collate


def pair_lengths(features: Sequence) -> list[int]:
    """Each pair's (or KTO row's) token count for length grouping: the ``length`` column, else
    the longer of its two sequences."""
    lengths = getattr(features, "lengths", None)
    if lengths is not None:
        return lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
    out = []
    for f in features:
        if "length" in f:
            out.append(int(f["length"]))
        elif "chosen_input_ids" in f:
            out.append(max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])))
        else:
            out.append(len(f["input_ids"]))
    return out


def is_unpaired(features: Sequence) -> bool:
    """KTO rows (input_ids, labels, desirable) rather than chosen/rejected pairs."""
    return len(features) > 0 and "desirable" in features[0]


def _split_at_answer(ids: list[int], labels: list[int]) -> int:
    """The index of the first answer token (the first label that is not ignored)."""
    for i, y in enumerate(labels):
        if y != IGNORE_INDEX:
            return i
    return len(ids)


class KtoRows(Sequence):
    """KTO rows, each with a mismatched sequence for the KL estimate: its own prompt followed by
    the answer of the next row of the split (wrapping around). Fixed per row, so a reference
    scored once before training (precompute_reference) scores the same mismatched sequences."""

    def __init__(self, features: Sequence):
        self.features = features
        self.lengths = pair_lengths(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i):
        row = dict(self.features[i])
        other = self.features[(i + 1) % len(self.features)]
        cut = _split_at_answer(row["input_ids"], row["labels"])
        at = _split_at_answer(other["input_ids"], other["labels"])
        answer = list(other["input_ids"][at:])
        row["kl_input_ids"] = list(row["input_ids"][:cut]) + answer
        row["kl_labels"] = [IGNORE_INDEX] * cut + list(other["labels"][at:])
        return row


class WithReference(Sequence):
    """Features with the reference's precomputed log-probs beside each row (``ref``: a dict of
    column -> float tensor, one value per row)."""

    def __init__(self, features: Sequence, ref: dict[str, torch.Tensor]):
        self.features, self.ref = features, ref
        self.lengths = pair_lengths(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i):
        row = dict(self.features[i])
        for k, v in self.ref.items():
            row[k] = float(v[i])
        return row


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows, one right-padded batch of 2B rows (labels -100 on padding);
    precomputed reference log-probs ride along as float tensors."""
    seqs = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in rows]
    seqs += [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
    out = collate(seqs, pad_id)
    for k in ("ref_chosen", "ref_rejected"):
        if k in rows[0]:
            out[k] = torch.tensor([r[k] for r in rows], dtype=torch.float32)
    return out


def collate_kto(rows: list[dict], pad_id: int) -> dict:
    """KTO rows padded, their desirable flags, and (``kl_*``) their mismatched sequences."""
    out = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)
    out["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows], dtype=torch.bool)
    if "kl_input_ids" in rows[0]:
        kl = collate(
            [{"input_ids": r["kl_input_ids"], "labels": r["kl_labels"]} for r in rows], pad_id
        )
        out.update({f"kl_{k}": v for k, v in kl.items()})
    for k in ("ref_logps", "ref_kl_logps"):
        if k in rows[0]:
            out[k] = torch.tensor([r[k] for r in rows], dtype=torch.float32)
    return out


def pair_collator(pad_id: int, unpaired: bool):
    """The loaders' collate function for pair tasks."""
    fn = collate_kto if unpaired else collate_pairs
    return lambda rows: fn(rows, pad_id)


def pairs_in(batch: dict):
    """What a pair task's loss averages over in a micro-batch: pairs (or KTO rows)."""
    n = batch["input_ids"].shape[0] // (1 if "desirable" in batch else 2)
    return torch.full((), n, device=batch["input_ids"].device, dtype=torch.long)


# --------------------------------------------------------------------------- log-probs


def sequence_logps(model, input_ids, attention_mask, labels):
    """(summed log-probs of the answer tokens [N], their count [N]), float32; labels -100 are not
    counted. The head runs on the answer positions only, in chunks (forward.py)."""
    ce, mask = supervised_cross_entropy(
        model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    )
    return -ce.sum(dim=1), mask.sum(dim=1)


def pair_logps(model, batch: dict):
    """(chosen sums, rejected sums, chosen counts, rejected counts): one forward over the 2B rows."""
    s, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = s.shape[0] // 2
    return s[:b], s[b:], n[:b], n[b:]


def pair_rewards(model, batch: dict):
    """A reward model's scores (its one logit) of the chosen and of the rejected rows."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    r = out.logits.float().reshape(-1)
    b = r.shape[0] // 2
    return r[:b], r[b:]


# --------------------------------------------------------------------------- the losses


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (log-ratio chosen - log-ratio
    rejected)); with ``label_smoothing`` e, conservative DPO: the pair is taken as flipped with
    probability e: -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = (
        -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    )
    return loss, _rewards(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected))


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_n, rejected_n, beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 on the log-ratios averaged per answer
    token (as the IPO authors' runs and TRL do: the squared loss would otherwise grow with length)."""
    h = (chosen - ref_chosen) / chosen_n.clamp(min=1) - (
        rejected - ref_rejected
    ) / rejected_n.clamp(min=1)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, _rewards(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected))


def simpo_loss(chosen, rejected, chosen_n, rejected_n, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log
    pi(y_l) - gamma): length-normalised, no reference model, ``gamma`` the target margin."""
    cr = beta * chosen / chosen_n.clamp(min=1)
    rr = beta * rejected / rejected_n.clamp(min=1)
    return -F.logsigmoid(cr - rr - gamma), _rewards(cr, rr)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(chosen, rejected, chosen_n, rejected_n, lam: float):
    """ORPO (Hong et al. 2024, eq. 6-7): the chosen answer's NLL (per token) minus lambda times
    log sigmoid(log odds(y_w) - log odds(y_l)), odds = P / (1 - P) on the per-token average
    log-probs; no reference model."""
    c = chosen / chosen_n.clamp(min=1)
    r = rejected / rejected_n.clamp(min=1)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    loss = -c - lam * F.logsigmoid(log_odds)
    return loss, _rewards(lam * c.detach(), lam * r.detach())


def kto_loss(
    logps,
    ref_logps,
    desirable,
    kl_logps,
    ref_kl_logps,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """KTO (Ethayarajh et al. 2024, eq. 7-8): z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over
    mismatched (prompt, answer) pairs, no gradient; desirable rows lose w_d (1 - sigmoid(beta
    (r - z0))), undesirable ones w_u (1 - sigmoid(beta (z0 - r))), r the row's log-ratio."""
    z0 = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return loss, {"rewards": beta * ratio.detach(), "kl": z0}


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """A reward model's pairwise loss (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1):
    -log sigmoid(r(chosen) - r(rejected))."""
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return loss, _rewards(chosen_rewards.detach(), rejected_rewards.detach())


def _rewards(chosen, rejected) -> dict:
    return {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach()}


# --------------------------------------------------------------------------- the objective


@dataclass
class PairObjective:
    """What a pair task computes per micro-batch: the loss over its pairs and their statistics.

    ``reference``: "precomputed" (the batch carries the reference's log-probs), "adapter" (the
    policy with its adapter disabled: no second copy), "model" (``ref_model``, frozen), or None
    (SimPO, ORPO and reward models use none)."""

    task: str
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 1.0
    lam: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str | None = None
    ref_model: object = None

    @classmethod
    def of(cls, recipe, reference: str | None = None, ref_model=None) -> PairObjective:
        p = recipe.preference
        return cls(
            task=recipe.task,
            loss=p.loss,
            beta=p.beta_value,
            label_smoothing=p.label_smoothing,
            gamma=p.gamma,
            lam=p.lambda_,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
            reference=reference,
            ref_model=ref_model,
        )

    def reference_logps(self, model, input_ids, attention_mask, labels):
        """The reference's summed log-probs (no gradient): the adapter-disabled policy or the
        reference model, in eval mode (no dropout: the same numbers as a precomputed pass)."""
        with torch.no_grad():
            if self.reference == "adapter":
                inner = getattr(model, "module", model)
                was = inner.training
                inner.eval()
                try:
                    with inner.disable_adapter():
                        s, _ = sequence_logps(inner, input_ids, attention_mask, labels)
                finally:
                    inner.train(was)
                return s
            s, _ = sequence_logps(self.ref_model, input_ids, attention_mask, labels)
            return s

    def sums(self, model, batch: dict):
        """(summed loss over the micro-batch's pairs, their count, the STATS sums as one float64
        tensor): all on the device, no host sync."""
        if self.task == "reward":
            cr, rr = pair_rewards(model, batch)
            loss, m = bradley_terry_loss(cr, rr)
            return loss.sum(), pairs_in(batch), self._stats(m, cr, rr, None, None, None)
        if self.loss == "kto":
            return self._kto(model, batch)
        c, r, cn, rn = pair_logps(model, batch)
        ref_c = ref_r = None
        if self.reference == "precomputed":
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        elif self.reference is not None:
            ref = self.reference_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            ref_c, ref_r = ref[: c.shape[0]], ref[c.shape[0] :]
        if self.loss == "dpo":
            loss, m = dpo_loss(c, r, ref_c, ref_r, self.beta, self.label_smoothing)
        elif self.loss == "ipo":
            loss, m = ipo_loss(c, r, ref_c, ref_r, cn, rn, self.beta)
        elif self.loss == "simpo":
            loss, m = simpo_loss(c, r, cn, rn, self.beta, self.gamma)
        else:
            loss, m = orpo_loss(c, r, cn, rn, self.lam)
        return loss.sum(), pairs_in(batch), self._stats(m, c, r, ref_c, None, None)

    def _kto(self, model, batch: dict):
        s, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        kl_args = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        with torch.no_grad():
            kl_s, _ = sequence_logps(model, *kl_args)
        if self.reference == "precomputed":
            ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        else:
            ref = self.reference_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            ref_kl = self.reference_logps(model, *kl_args)
        d = batch["desirable"]
        loss, m = kto_loss(
            s, ref, d, kl_s, ref_kl, self.beta, self.desirable_weight, self.undesirable_weight
        )
        return loss.sum(), pairs_in(batch), self._stats(None, s, None, ref, d, m)

    @staticmethod
    def _stats(m, chosen, rejected, ref_chosen, desirable, kto) -> torch.Tensor:
        """The STATS sums of one micro-batch (float64, on the device)."""
        z = chosen.new_zeros((), dtype=torch.float64)
        if desirable is not None:  # KTO: desirable rows stand for chosen, the others for rejected
            c = chosen.detach().double()
            dd = desirable.double()
            kl = (c - ref_chosen.double()) * dd
            return torch.stack(
                [
                    z,
                    z,
                    z,
                    (c * dd).sum(),
                    dd.sum(),
                    (c * (1 - dd)).sum(),
                    (1 - dd).sum(),
                    kl.sum(),
                    dd.sum(),
                ]
            )
        cr, rr = m["chosen_rewards"].double(), m["rejected_rewards"].double()
        c, r = chosen.detach().double(), rejected.detach().double()
        n = torch.full_like(z, c.shape[0])
        kl = (c - ref_chosen.double()).sum() if ref_chosen is not None else z
        kl_n = n if ref_chosen is not None else z
        return torch.stack(
            [n, (cr > rr).double().sum(), (cr - rr).sum(), c.sum(), n, r.sum(), n, kl, kl_n]
        )


def stats_row(stats: list[float], task: str) -> dict:
    """The log row's pair metrics from summed STATS (empty where nothing was counted)."""
    s = dict(zip(STATS, stats, strict=True))
    row = {}
    if s["pairs"]:
        row["reward_accuracy"] = round(s["correct"] / s["pairs"], 4)
        row["reward_margin"] = s["margin"] / s["pairs"]
    what = "reward" if task == "reward" else "logps"
    if s["chosen_n"]:
        row[f"{what}_chosen"] = s["chosen"] / s["chosen_n"]
    if s["rejected_n"]:
        row[f"{what}_rejected"] = s["rejected"] / s["rejected_n"]
    if s["kl_n"]:
        row["kl_chosen"] = s["kl"] / s["kl_n"]
    return row


# --------------------------------------------------------------------------- the reference


def reference_mode(recipe) -> str | None:
    """Where a run's reference log-probs come from while it trains: "adapter" (the policy with
    its adapter disabled: reference start with an adapter-based method), "model" (a second,
    frozen model: full fine-tuning, or a reference named apart from the start), or None (SimPO,
    ORPO and reward models use none). precompute_reference scores that same source once."""
    p = recipe.preference
    if recipe.task != "preference" or not p.uses_reference:
        return None
    return "adapter" if p.reference == "start" and recipe.method.kind != "full" else "model"


def _rows_digest(features: Sequence) -> str:
    """sha256 of the token ids and labels the reference scores, row by row."""
    import hashlib
    import json

    h = hashlib.sha256()
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    keys += ("input_ids", "labels", "kl_input_ids", "kl_labels")
    for f in features:
        h.update(json.dumps([list(f[k]) for k in keys if k in f]).encode())
    return h.hexdigest()


def _weights_identity(folder: str) -> list:
    """What identifies a model folder's weights cheaply: each weights file's name, size, mtime."""
    from pathlib import Path

    path = Path(folder)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return [str(path.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def reference_cache_path(recipe, model_dir: str, features: Sequence, split: str):
    """The file that keeps a split's precomputed reference log-probs in the data cache: keyed by
    the rows, the reference's weights, how it is loaded and the precision it is scored in."""
    import hashlib
    import json

    from ftcli.data.store import data_cache_dir

    p = recipe.preference
    ref = model_dir if p.reference == "start" else p.reference
    from ftcli.models import run_folder_start

    start = run_folder_start(ref) if ref != model_dir else None
    folder = str(start) if start is not None else ref
    ident = {
        "rows": _rows_digest(features),
        "weights": _weights_identity(folder),
        "reference": ref,
        "quantized": recipe.method.kind == "qlora",
        "dtype": recipe.model.dtype,
        "mixed_precision": recipe.train.mixed_precision,
        "split": split,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return data_cache_dir() / "reference" / f"{key}.pt"


def score_reference(
    objective: PairObjective, model, features: Sequence, pad_id: int, device, autocast
):
    """The reference's summed log-probs of every row of ``features``, in row order: pairs give
    ref_chosen and ref_rejected, KTO rows ref_logps and ref_kl_logps."""
    unpaired = is_unpaired(features)
    lengths = pair_lengths(features)
    order = sorted(range(len(features)), key=lambda i: lengths[i])
    cols = ("ref_logps", "ref_kl_logps") if unpaired else ("ref_chosen", "ref_rejected")
    out = {c: torch.zeros(len(features), dtype=torch.float32) for c in cols}
    collate_fn = pair_collator(pad_id, unpaired)
    for s in range(0, len(order), 16):
        idx = order[s : s + 16]
        b = {k: v.to(device) for k, v in collate_fn([features[i] for i in idx]).items()}
        with autocast():
            if unpaired:
                a = objective.reference_logps(
                    model, b["input_ids"], b["attention_mask"], b["labels"]
                )
                kl = (b["kl_input_ids"], b["kl_attention_mask"], b["kl_labels"])
                z = objective.reference_logps(model, *kl)
            else:
                both = objective.reference_logps(
                    model, b["input_ids"], b["attention_mask"], b["labels"]
                )
                a, z = both[: len(idx)], both[len(idx) :]
        out[cols[0]][idx] = a.float().cpu()
        out[cols[1]][idx] = z.float().cpu()
    return out


def pair_objective(
    recipe,
    model,
    load_reference,
    splits: dict[str, Sequence],
    *,
    model_dir: str,
    pad_id: int,
    device,
    autocast,
    note=None,
):
    """The objective of a pair task, and its splits as the loop reads them: KTO rows with their
    mismatched sequences; with precompute_reference, every row with the reference's log-probs
    (scored once, kept in the data cache, reused by the next run on the same rows and weights).
    ``load_reference()`` loads the frozen reference model, called only when one is needed."""
    mode = reference_mode(recipe)
    unpaired = recipe.task == "preference" and recipe.preference.loss == "kto"
    splits = {k: (KtoRows(v) if unpaired and len(v) else v) for k, v in splits.items()}
    if mode is None or not recipe.preference.precompute_reference:
        ref_model = load_reference() if mode == "model" else None
        return PairObjective.of(recipe, mode, ref_model), splits
    scorer = PairObjective.of(recipe, mode)
    out = {}
    for name, feats in splits.items():
        if not len(feats):
            out[name] = feats
            continue
        path = reference_cache_path(recipe, model_dir, feats, name)
        ref = None
        if path.exists():
            try:
                ref = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, EOFError):
                ref = None  # damaged: scored again
        if ref is None or any(len(v) != len(feats) for v in ref.values()):
            if mode == "model" and scorer.ref_model is None:
                scorer.ref_model = load_reference()
            ref = score_reference(scorer, model, feats, pad_id, device, autocast)
            _save_atomic(ref, path)
            if note:
                note(f"  reference scored on {len(feats)} {name} rows, kept in {path}")
        elif note:
            note(f"  reference log-probs of {name} read from {path}")
        out[name] = WithReference(feats, ref)
    return PairObjective.of(recipe, "precomputed"), out


def _save_atomic(obj, path) -> None:
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- evaluation


def evaluate_pairs(
    task: str, model, features: Sequence, pad_id: int, batch_size: int, device
) -> dict:
    """Held-out pair metrics of a trained model: a reward model's accuracy (chosen scored above
    rejected) and mean margin; a preference policy's accuracy by its own log-probs (chosen more
    likely than rejected, summed and per token) and the mean summed-log-prob margin."""
    was = model.training
    model.eval()
    unpaired = is_unpaired(features)
    if unpaired:
        return {}
    right = right_avg = margin = 0.0
    n = 0
    with torch.no_grad():
        for s in range(0, len(features), batch_size):
            rows = [features[i] for i in range(s, min(len(features), s + batch_size))]
            b = {k: v.to(device) for k, v in collate_pairs(rows, pad_id).items()}
            if task == "reward":
                c, r = pair_rewards(model, b)
                cn = rn = torch.ones_like(c)
            else:
                c, r, cn, rn = pair_logps(model, b)
            right += (c > r).sum().item()
            right_avg += (c / cn.clamp(min=1) > r / rn.clamp(min=1)).sum().item()
            margin += (c - r).sum().item()
            n += len(rows)
    model.train(was)
    if not n:
        return {}
    if task == "reward":
        return {"accuracy": right / n, "mean_margin": margin / n, "pairs": n}
    return {
        "logp_accuracy": right / n,
        "logp_per_token_accuracy": right_avg / n,
        "mean_logp_margin": margin / n,
        "pairs": n,
    }
