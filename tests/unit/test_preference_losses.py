"""Each preference loss equals TRL's (the dev-only reference implementation) on identical fixed
log-probs, within 1e-6.

TRL computes its losses inside its trainers' ``_compute_loss`` (DPO, KTO, reward) or in methods
that read only a few attributes (CPO's ``cpo_loss`` for SimPO, ORPO's ``odds_ratio_loss``). The
tests call TRL's own code with a minimal trainer-like object and a stand-in model whose forward
returns the fixed per-token log-probs, so nothing of TRL's formula is rewritten here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ftcli.train.objectives import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

trl = pytest.importorskip("trl")

B, T = 6, 5  # pairs, tokens per answer (positions after the prompt)
TOL = 1e-6


def _fixed(seed: int):
    """Per-token log-probs [2B, T] (chosen rows first) with ragged answer lengths, and the mask
    of answer tokens."""
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return per_token * mask, mask


class _Acc:
    """The accelerator attributes TRL's loss code touches, for one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class _Model:
    """Stands in for TRL's fused-head model output: per-token log-probs of shifted positions."""

    training = True

    def __init__(self, log_probs, by_ids=None):
        self.log_probs, self.by_ids = log_probs, by_ids or {}

    def __call__(self, input_ids=None, **kwargs):
        lp = self.by_ids.get(id(input_ids), self.log_probs)
        n, t = lp.shape
        z = torch.zeros(n, t, dtype=lp.dtype)
        return SimpleNamespace(
            log_probs=lp, entropy=z, mean_logits=z, is_top1=torch.zeros(n, t, dtype=torch.bool)
        )


def _inputs(mask):
    """input_ids/attention_mask/completion_mask with one prompt position before the answers,
    so the shifted completion mask is ``mask``."""
    n = mask.shape[0]
    completion = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask], dim=1)
    return {
        "input_ids": torch.ones(n, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, T + 1, dtype=torch.long),
        "completion_mask": completion,
    }


def _trl_dpo(per_token, mask, ref, loss_type: str, beta: float, label_smoothing: float = 0.0):
    from trl import DPOTrainer

    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Acc(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = _inputs(mask)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:B], ref[B:]
    return DPOTrainer._compute_loss(fake, _Model(per_token), inputs, False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl_sigmoid(beta):
    per_token, mask = _fixed(0)
    logps = per_token.sum(1)
    ref = logps + torch.linspace(-1, 1, 2 * B, dtype=torch.float64)
    expected = _trl_dpo(per_token, mask, ref, "sigmoid", beta)
    loss, m = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)
    assert abs(loss.mean().item() - expected.item()) < TOL
    assert torch.allclose(m["chosen_rewards"], beta * (logps[:B] - ref[:B]))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_equals_trl_label_smoothing(eps):
    """label_smoothing is conservative DPO, as TRL's sigmoid loss with label smoothing (kept by
    its CPO trainer, whose logits are the policy's log-ratio: fed the DPO margin here)."""
    from trl.experimental.cpo import CPOTrainer

    per_token, _ = _fixed(1)
    logps = per_token.sum(1)
    ref = logps * 0.7
    beta = 0.2
    fake = SimpleNamespace(
        alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps, accelerator=_Acc()
    )
    trl_losses, _, _ = CPOTrainer.cpo_loss(fake, logps[:B] - ref[:B], logps[B:] - ref[B:])
    loss, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, eps)
    assert torch.allclose(loss, trl_losses, atol=TOL, rtol=0)
    # and it is not plain DPO
    plain, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)
    assert (loss - plain).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_equals_trl(beta):
    per_token, mask = _fixed(2)
    logps = per_token.sum(1)
    n = mask.sum(1)
    ref = logps - 0.3 * n
    expected = _trl_dpo(per_token, mask, ref, "ipo", beta)
    loss, _ = ipo_loss(logps[:B], logps[B:], ref[:B], ref[B:], n[:B], n[B:], beta)
    assert abs(loss.mean().item() - expected.item()) < TOL


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.5)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma):
    """TRL's SimPO is CPOTrainer with loss_type simpo on per-token average log-probs (its
    simpo_gamma is the target margin: the logits lose gamma/beta before the beta scale)."""
    from trl.experimental.cpo import CPOTrainer

    per_token, mask = _fixed(3)
    logps, n = per_token.sum(1), mask.sum(1)
    avg = logps / n
    fake = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=0.0,
        accelerator=_Acc(),
    )
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(fake, avg[:B], avg[B:])
    loss, m = simpo_loss(logps[:B], logps[B:], n[:B], n[B:], beta, gamma)
    assert torch.allclose(loss, trl_losses, atol=TOL, rtol=0)
    assert torch.allclose(m["chosen_rewards"], trl_c, atol=TOL, rtol=0)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_equals_trl(lam):
    """TRL's ORPO loss is its chosen NLL minus mean(beta * log sigmoid(log odds)) (beta is ORPO's
    lambda) on per-token average log-probs. Its NLL is a token mean over the batch; with equal
    answer lengths that is the mean of ftcli's per-answer NLLs, so the lengths are equal here."""
    from trl.experimental.orpo import ORPOTrainer

    per_token, _ = _fixed(4)
    mask = torch.ones_like(per_token, dtype=torch.long)
    per_token = -torch.rand(
        2 * B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    logps, n = per_token.sum(1), mask.sum(1)
    avg = logps / n
    fake = SimpleNamespace(beta=lam, accelerator=_Acc())
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, avg[:B], avg[B:])
    nll = -per_token[:B].mean()  # TRL's cross-entropy over the chosen tokens
    expected = nll - losses.mean()
    loss, _ = orpo_loss(logps[:B], logps[B:], n[:B], n[B:], lam)
    assert abs(loss.mean().item() - expected.item()) < TOL


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_equals_trl(weights):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs, its KL sequences
    scored by the same stand-in model."""
    from trl import KTOTrainer

    per_token, mask = _fixed(5)
    kl_per_token, kl_mask = _fixed(6)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    ref = per_token.sum(1) + torch.linspace(-0.5, 0.8, 2 * B, dtype=torch.float64)
    ref_kl = kl_per_token.sum(1) - 0.4  # a positive KL estimate: z0 is not clamped to 0
    inputs = _inputs(mask)
    kl = _inputs(kl_mask)
    inputs.update(
        KL_input_ids=kl["input_ids"],
        KL_attention_mask=kl["attention_mask"],
        KL_completion_mask=kl["completion_mask"],
        label=desirable.long(),
        ref_logps=ref,
        ref_KL_logps=ref_kl,
    )
    model = _Model(per_token, {id(kl["input_ids"]): kl_per_token})
    beta = 0.3
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Acc(),
        aux_loss_enabled=False,
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake, m, b)
    expected = KTOTrainer._compute_loss(fake, model, inputs, False)
    loss, m = kto_loss(
        per_token.sum(1), ref, desirable, kl_per_token.sum(1), ref_kl, beta, *weights
    )
    assert abs(loss.mean().item() - expected.item()) < TOL
    assert m["kl"].item() > 0 and math.isclose(
        m["kl"].item(), fake._metrics["train"]["kl"][0], abs_tol=TOL
    )


def test_kto_kl_estimate_is_clamped_at_zero():
    s = torch.zeros(4)
    loss, m = kto_loss(s, s, torch.tensor([1, 0, 1, 0]).bool(), s - 1, s, 0.1)
    assert m["kl"].item() == 0.0
    assert torch.allclose(loss, torch.full((4,), 0.5))


def test_bradley_terry_equals_trl_reward_trainer():
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2 * B, 1, generator=g, dtype=torch.float64)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=_Acc(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(2 * B, 3, dtype=torch.long)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    expected = RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=logits), inputs)
    loss, m = bradley_terry_loss(logits[:B, 0], logits[B:, 0])
    assert abs(loss.mean().item() - expected.item()) < TOL
    acc = (m["chosen_rewards"] > m["rejected_rewards"]).double().mean().item()
    assert math.isclose(acc, fake._metrics["train"]["accuracy"][0], abs_tol=TOL)
