"""The fast paths compute what the plain ones compute: the LM head on supervised positions only
(chunked), and packed micro-batches with attention isolated per example, on the tiny Llama and
GPT-2 (eager and SDPA attention), losses and gradients within 1e-5."""

from __future__ import annotations

import random

import pytest
import torch

from ftcli.data.tokenize import IGNORE_INDEX, PAD_MULTIPLE, collate, pack, pack_rows
from ftcli.forward import loss_sums, supervised_cross_entropy, token_cross_entropy


def _features(vocab: int, n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    feats = []
    for _ in range(n):
        k = rng.randrange(5, 30)
        ids = [rng.randrange(3, vocab) for _ in range(k)]
        cut = rng.randrange(1, k - 1)  # a prompt, then the supervised completion
        feats.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * k,
                "labels": [IGNORE_INDEX] * cut + ids[cut:],
            }
        )
    return feats


def _model(tiny_models, arch: str, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_models[arch], attn_implementation=attn, dtype=torch.float32
    ).train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    s, c = loss_sums(model, batch, "causal_lm")
    (s / c).backward()
    return (s / c).item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_supervised_positions_loss_equals_the_naive_loss(tiny_models, arch):
    model = _model(tiny_models, arch, "sdpa")
    model.config.dropout = 0.0
    model.eval()  # dropout off: both paths see the same network
    batch = collate(_features(model.config.vocab_size), pad_id=0)
    naive_ce, naive_mask = token_cross_entropy(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    ce, mask = supervised_cross_entropy(model, batch, chunk=7)  # several chunks, one ragged
    assert torch.equal(mask, naive_mask)
    assert torch.allclose(ce, naive_ce, atol=1e-5)
    assert ce[mask].gt(0).all() and ce[~mask].eq(0).all()
    # and the gradients of the mean loss
    naive = naive_ce.sum() / naive_mask.sum()
    model.zero_grad()
    naive.backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss, g1 = _loss_and_grads(model, batch)
    assert loss == pytest.approx(naive.item(), abs=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5), n


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_batch_equals_unpacked(tiny_models, arch, attn):
    model = _model(tiny_models, arch, attn)
    model.eval()
    feats = _features(model.config.vocab_size, n=7, seed=1)
    loss_u, grads_u = _loss_and_grads(model, collate(feats, pad_id=0))
    # rows as long as the longest example; rows of 40 tokens; one row of everything
    for row_tokens in (None, 40, 10_000):
        packed = pack(feats, pad_id=0, row_tokens=row_tokens)
        assert packed["real_mask"].sum() == sum(len(f["input_ids"]) for f in feats)
        loss_p, grads_p = _loss_and_grads(model, packed)
        assert loss_p == pytest.approx(loss_u, abs=1e-5)
        for n in grads_u:
            assert torch.allclose(grads_u[n], grads_p[n], atol=1e-5), (row_tokens, n)


def test_position_ids_alone_leak_and_the_block_mask_isolates(tiny_models):
    """Why pack() builds a mask: without it the second example sees the first
    (docs/traps.md#packing-needs-a-mask)."""
    model = _model(tiny_models, "llama", "sdpa").eval()
    feats = sorted(
        _features(model.config.vocab_size, n=2, seed=2), key=lambda f: -len(f["input_ids"])
    )
    packed = pack(feats, pad_id=0, row_tokens=10_000)  # one row, the longer example first
    k0, k1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([feats[1]["input_ids"]])).logits[0]
        isolated = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            attention_mask=packed["attention_mask"],
        ).logits[0, k0 : k0 + k1]  # the row's tail past k0 + k1 is padding to PAD_MULTIPLE
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[
            0, k0 : k0 + k1
        ]
    assert torch.allclose(isolated, alone, atol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3


def test_batches_are_padded_to_a_multiple_of_eight_except_varlen():
    """Widths round up to PAD_MULTIPLE (fewer distinct shapes for the allocator); the extra
    positions are padding: masked, unsupervised and not counted as real tokens."""
    feats = _features(100, n=5, seed=3)
    longest, total = (
        max(len(f["input_ids"]) for f in feats),
        sum(len(f["input_ids"]) for f in feats),
    )
    for left in (False, True):
        b = collate(feats, pad_id=0, left=left)
        assert b["input_ids"].shape[1] % PAD_MULTIPLE == 0 and b["input_ids"].shape[1] >= longest
        assert b["attention_mask"].sum() == total
    p = pack(feats, pad_id=0, row_tokens=10_000)
    assert p["input_ids"].shape[1] % PAD_MULTIPLE == 0 and p["real_mask"].sum() == total
    assert (p["labels"][p["real_mask"] == 0] == IGNORE_INDEX).all()
    assert pack(feats, pad_id=0, varlen=True)["input_ids"].shape == (1, total)


def test_pack_rows_respects_the_budget_and_keeps_every_example():
    lengths = [30, 10, 12, 25, 3, 40]
    rows = pack_rows(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) == 3  # 120 tokens: 40 | 30+10 | 25+12+3, rows filled exactly


def test_speed_keys_that_do_nothing_are_errors(tmp_path):
    from ftcli.errors import RecipeError
    from ftcli.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(
        "name: x\ntask: classification\nmodel: {name: m}\ndata: {path: d.csv, label_column: y,"
        " packing: true, max_length: 64}\nmethod: {kind: lora}\n"
        "train: {device: cpu, kernels: liger, batch_tokens: 32}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(p)
    text = "\n".join(x.render() for x in info.value.problems)
    assert "data.packing" in text and "only applies to task causal_lm" in text
    assert "train.kernels" in text and "train.batch_tokens" in text
    r = load_recipe(p, ["data.packing=null", "train.kernels=none", "train.batch_tokens=64"])
    assert not r.data.packs(r.task) and r.train.group_by_length


def test_native_bf16_is_read_from_the_cpu_flags():
    from ftcli.models import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 fma\n")  # emulated bf16: stay fp32
