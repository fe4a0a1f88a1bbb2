"""The memory estimator's arithmetic, each component against a hand computation, and the
meta-device build of every bundled architecture card."""

from __future__ import annotations

import math

import pytest

from ftcli.errors import FtcliError
from ftcli.memory import plan_model
from ftcli.memory.arch import (
    attach_lora_meta,
    build_meta,
    find_card,
    inventory,
    load_cards,
    load_config,
)
from ftcli.memory.estimate import (
    BNB_OPT_BLOCK,
    CPU_RUNTIME,
    estimate,
    fits_cards,
    max_micro_batch,
    optimizer_state_bytes,
    precision_table,
    quantized_bytes,
)
from ftcli.memory.setup import GB, Setup, parse_budget

# Parameter counts published for these models (model cards / papers), to the parameter.
KNOWN_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2b": 2_506_172_416,
    "gpt2": 124_439_808,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "bert-large-uncased": 335_141_888
    + 1024 * 2
    + 2,  # BertModel with pooler + a 2-label classifier
}


def test_every_card_is_checked():
    assert set(load_cards()) == set(KNOWN_PARAMS)


@pytest.mark.parametrize("card", sorted(KNOWN_PARAMS))
def test_meta_build_of_each_card_has_the_published_parameter_count(card):
    loaded = load_config(card)
    assert loaded.source == "card"
    task = "classification" if card.startswith("bert") else "causal_lm"
    model = build_meta(loaded.config, task)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert inventory(model, loaded.config).total == KNOWN_PARAMS[card]


def test_cards_answer_to_hub_ids_case_insensitively():
    assert find_card("meta-llama/Llama-2-7b-hf")["ftcli_card"]["name"] == "llama-2-7b"
    assert find_card("HUGGINGFACETB/SMOLLM2-135M")["ftcli_card"]["name"] == "smollm2-135m"
    assert find_card("no-such/model") is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("24000MB", 24 * 10**9),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("512mib", 512 * 2**20),
        ("80gb", 80 * 10**9),
    ],
)
def test_budget_strings(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["24", "24 parsecs", "", "GB", "-3GB", "24G"])
def test_bad_budget_is_a_clear_error(bad):
    with pytest.raises(FtcliError) as exc:
        parse_budget(bad)
    assert "budget" in str(exc.value)


def test_lora_r8_on_a_768x768_projection_is_12288_parameters():
    from transformers import BertConfig

    cfg = BertConfig(
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=1000,
    )
    model = attach_lora_meta(
        build_meta(cfg, "classification"),
        "classification",
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=None,
    )
    inv = inventory(model, cfg)
    q = inv.lora_targets["attention.self.query"]
    assert (q["in"], q["out"], q["count"]) == (768, 768, 2)
    assert q["lora"] // q["count"] == 8 * (768 + 768) == 12_288
    # 2 layers x (query + value) x 12,288 adapters, plus the trained classifier (768 x 2 + 2)
    assert inv.trainable == 4 * 12_288 + 768 * 2 + 2


def test_nf4_bytes_per_weight():
    n, out = 4096 * 4096, 4096
    packed, scales = quantized_bytes(n, out, Setup(method="qlora", double_quant=True))
    assert packed == n // 2
    assert (packed + scales) / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)  # ~0.516
    assert (packed + scales) / n == pytest.approx(0.516, abs=0.001)
    packed, scales = quantized_bytes(n, out, Setup(method="qlora", double_quant=False))
    assert (packed + scales) / n == pytest.approx(0.5625, abs=1e-4)  # an fp32 scale per 64 weights
    q8 = sum(quantized_bytes(n, out, Setup(method="qlora", quant_bits=8)))
    assert q8 == n + 4 * out  # int8 + an fp32 scale per output row


def test_precision_table_of_a_7b_model():
    inv = plan_model("llama-2-7b", method="full").inv
    rows = {
        r["precision"].split(" ")[0] + (" dq" if "double" in r["precision"] else ""): r
        for r in precision_table(inv)
    }
    n = 6_738_415_616
    assert rows["fp32"]["bytes"] == 4 * n  # ~27 GB: "about 28"
    assert rows["fp16/bf16"]["bytes"] == 2 * n
    assert 6.7e9 < rows["int8"]["bytes"] < 7.3e9
    assert rows["nf4"]["quantized_bytes_per_param"] == pytest.approx(0.5625, abs=1e-3)
    assert rows["nf4 dq"]["quantized_bytes_per_param"] == pytest.approx(0.516, abs=1e-3)
    # 3.3 GB of NF4 + scales for the linear layers, 0.5 GB of fp16 embeddings and head
    embed_and_head = 2 * 32000 * 4096
    assert rows["nf4 dq"]["bytes"] == pytest.approx(
        0.5159 * (n - embed_and_head - 65 * 4096) + 2 * (embed_and_head + 65 * 4096), rel=2e-3
    )


def _p(numel, shape=None):
    from ftcli.memory.arch import Param

    return Param(name="w", numel=numel, shape=shape or (numel,), kind="linear", trainable=True)


@pytest.mark.parametrize(
    "optimizer,dtype,per_param",
    [
        ("adamw", "float32", 8),
        ("adam", "bfloat16", 4),
        ("sgd", "float32", 4),
        ("rmsprop", "float32", 8),
        ("paged_adamw", "bfloat16", 8),
    ],
)
def test_optimizer_states(optimizer, dtype, per_param):
    n = 1_000_000
    assert (
        optimizer_state_bytes(_p(n), Setup(method="full", optimizer=optimizer, dtype=dtype))
        == per_param * n
    )


def test_eight_bit_adam_states():
    n = 1_000_000
    s = Setup(method="full", optimizer="adamw8bit")
    assert optimizer_state_bytes(_p(n), s) == 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    assert (
        optimizer_state_bytes(_p(1000), s) == 8 * 1000
    )  # below 4096 elements bitsandbytes keeps 32-bit states
    assert (
        optimizer_state_bytes(_p(0 + 100), Setup(method="full", optimizer="sgd", momentum=0.0)) == 0
    )


def test_bf16_full_finetuning_peaks_at_ten_bytes_per_parameter():
    """weights 2 + grads 2 + AdamW states 4 + foreach's temporary 2, at the optimizer step."""
    plan = plan_model(
        "mistral-7b",
        method="full",
        dtype="bfloat16",
        optimizer="adamw",
        batch_size=1,
        seq_len=512,
        gradient_checkpointing=True,
        attn_implementation="flash_attention_2",
        device="cuda",
    )
    est = plan.estimate()
    assert est.peak_phase == "optimizer step"
    n = plan.inv.total
    vectors = sum(p.numel for p in plan.inv.params if len(p.shape) < 2)
    assert est.peak_allocated == 2 * n + 2 * n + 4 * n + 2 * (n - vectors)


def test_lora_adapters_cost_16_bytes_each_with_adamw():
    plan = plan_model(
        "llama-2-7b",
        method="lora",
        dtype="bfloat16",
        r=16,
        target_modules=("q_proj", "v_proj"),
        device="cuda",
    )
    est = plan.estimate()
    lora = 32 * 2 * 16 * (4096 + 4096)
    assert est.lora_params == lora
    assert est.gradients == 4 * lora and est.optimizer_states == 8 * lora
    assert est.weights["by_precision"]["fp32"] == 4 * lora
    assert est.weights["by_precision"]["bf16"] == 2 * 6_738_415_616


def test_qlora_weights_by_precision():
    plan = plan_model(
        "llama-2-7b", method="qlora", r=8, target_modules=("q_proj", "v_proj"), device="cuda"
    )
    w = plan.estimate().weights["by_precision"]
    embed_and_head = 2 * 32000 * 4096
    norms = 65 * 4096
    assert (
        w["fp32"] == 4 * (embed_and_head + norms) + 4 * 32 * 2 * 8 * 8192
    )  # fp32 after kbit prep + adapters
    assert w["nf4"] == (6_738_415_616 - embed_and_head - norms) // 2


def test_llama_block_activations_by_hand():
    """SmolLM2-135M full FT in fp32 on the CPU (SDPA, no checkpointing): bytes saved per token per block."""
    plan = plan_model(
        "smollm2-135m", method="full", dtype="float32", device="cpu", batch_size=2, seq_len=64
    )
    a = plan.estimate().acts
    h, q, kv, n, i = 576, 576, 192, 9, 1536
    norms = 2 * (4 * h + 4 * h)  # RMSNorm: fp32 input + normalized x (its weight trains)
    attn_inputs = 4 * h  # q, k, v read one saved tensor
    attention = 4 * (q + 2 * kv) + 4 * q + 4 * n  # q, k, v, output, log-sum-exp
    o_in, mlp_in = 4 * q, 4 * h
    mlp = 3 * 4 * i  # gate output, SiLU output, up output
    down_in = 4 * i
    assert (
        a.detail["per_token_per_layer"]
        == norms + attn_inputs + attention + o_in + mlp_in + mlp + down_in
    )
    assert a.per_layer == 2 * 64 * a.detail["per_token_per_layer"]
    V = 49152
    # the transformers loss: the output (and its logits) is dropped before backward; the fp32
    # log-softmax output, its gradient and the input's gradient remain
    assert a.loss_peak == 2 * 64 * 12 * V
    assert a.loss_forward == 2 * 64 * (4 * V + 4 * V)  # logits + log-softmax after forward
    # ftcli's: hidden states gathered at the 128 supervised positions (and their gradient), then
    # one chunk's buffers (all 128 positions fit one 1,024-position chunk)
    b = plan.estimate(loss_path="ftcli").acts
    assert b.loss_forward == 2 * 64 * h * 4
    assert b.loss_peak == 2 * (2 * 64 * h * 4) + 2 * 64 * 12 * V
    long = plan.estimate(loss_path="ftcli", seq_len=4096).acts  # 8,192 positions: 8 chunks
    assert long.loss_peak == 2 * (2 * 4096 * h * 4) + 1024 * 12 * V


def test_checkpointing_keeps_block_inputs_only():
    common = dict(method="lora", dtype="bfloat16", batch_size=4, seq_len=1024, device="cuda", r=8)
    plain = plan_model("llama-2-7b", **common).estimate()
    gc = plan_model("llama-2-7b", gradient_checkpointing=True, **common).estimate()
    assert gc.acts.checkpoints == 4 * 1024 * 2 * 4096 * 32
    assert gc.acts.stored < plain.acts.stored / 5
    assert gc.total < plain.total


def test_eager_attention_stores_the_seq_by_seq_probabilities():
    common = dict(method="lora", dtype="bfloat16", batch_size=1, seq_len=2048, device="cuda")
    eager = plan_model("llama-2-7b", attn_implementation="eager", **common).estimate().acts
    flash = (
        plan_model("llama-2-7b", attn_implementation="flash_attention_2", **common).estimate().acts
    )
    # fp32 softmax output + its bf16 copy: 6 bytes per head per key per token
    assert (
        eager.detail["per_token_per_layer"] - flash.detail["per_token_per_layer"]
        >= 6 * 32 * 2048 - 4 * 32
    )


def test_fsdp_shards_and_ddp_replicates():
    base = dict(
        method="full",
        dtype="bfloat16",
        batch_size=1,
        seq_len=512,
        device="cuda",
        gradient_checkpointing=True,
    )
    one = plan_model("llama-2-7b", **base).estimate()
    fsdp8 = plan_model("llama-2-7b", num_devices=8, strategy="fsdp", **base).estimate()
    ddp8 = plan_model("llama-2-7b", num_devices=8, strategy="ddp", **base).estimate()
    assert fsdp8.total < one.total / 4
    assert ddp8.total > one.total  # gradient buckets on top of a full replica


def test_paged_optimizer_states_are_listed_not_counted():
    common = dict(method="full", dtype="bfloat16", batch_size=1, seq_len=256, device="cuda")
    paged = plan_model("smollm2-135m", optimizer="paged_adamw", **common).estimate()
    assert paged.optimizer_states == 0 and paged.optimizer_paged == 8 * paged.params_trainable


def test_cards_verdict_and_micro_batch_search():
    plan = plan_model(
        "llama-2-7b",
        method="qlora",
        batch_size=1,
        seq_len=2048,
        gradient_checkpointing=True,
        device="cuda",
    )
    est = plan.estimate()
    assert [c["fits"] for c in fits_cards(est.total)] == sorted(
        c["fits"] for c in fits_cards(est.total)
    )
    on_20 = {c["card_gb"]: c["fits"] for c in fits_cards(20 * 1024**3)}
    assert not on_20[16] and on_20[24]  # 20 GiB: too big for a 16 GB card, fits a 24 GB one
    budget = 24 * GB
    best = max_micro_batch(plan.inv, plan.setup, budget)
    assert best >= 1
    assert plan.estimate(batch_size=best).total <= budget < plan.estimate(batch_size=best + 1).total
    assert max_micro_batch(plan.inv, plan.setup, 1 * GB) == 0


def test_cpu_mode_differs_from_cuda_mode():
    common = dict(
        method="full", dtype="float32", batch_size=4, seq_len=128, checkpoint_bytes=4 * 134_515_008
    )
    cpu = plan_model("smollm2-135m", device="cpu", mixed_precision="no", **common).estimate()
    cuda = plan_model("smollm2-135m", device="cuda", mixed_precision="no", **common).estimate()
    assert cpu.overhead == CPU_RUNTIME and cuda.overhead > cpu.overhead  # CUDA context
    assert (
        cpu.phases["load"] == 0 and "load" not in cuda.phases
    )  # an fp32 checkpoint maps straight into the weights
    bf16_file = plan_model(
        "smollm2-135m", device="cpu", **{**common, "checkpoint_bytes": 2 * 134_515_008}
    ).estimate()
    assert (
        bf16_file.phases["load"] == 2 * 134_515_008 + bf16_file.weights["total"]
    )  # converted: file + new tensors
    q = plan_model("smollm2-135m", device="cpu", **{**common, "method": "qlora"}).estimate()
    fp32 = q.weights["by_precision"]["fp32"]
    assert (
        q.phases["load"] == 4 * 134_515_008 + q.weights["total"]
    )  # file pages + the tensors made from them
    assert q.mapped_checkpoint == 4 * 134_515_008 and fp32 > 0
    # per-tensor AdamW on the CPU: two temporaries as large as the largest tensor (the embedding)
    assert cpu.optimizer_step_temp == 2 * 4 * 49152 * 576


def test_setup_rejects_unknown_values():
    with pytest.raises(FtcliError, match="method 'dora' is not one of full, lora, qlora"):
        estimate(plan_model("gpt2", method="full").inv, Setup(method="dora"))


def test_the_fsdp_table_shows_per_device_components_beside_its_per_device_total():
    """The breakdown printed under FSDP is what one device holds, like the total below it."""
    base = dict(method="full", dtype="bfloat16", batch_size=1, seq_len=512, device="cuda")
    one = dict((n, b) for n, b, _ in plan_model("llama-2-7b", **base).estimate().components())
    est = plan_model("llama-2-7b", num_devices=8, strategy="fsdp", **base).estimate()
    rows = {n: (b, how) for n, b, how in est.components()}
    for name in ("weights bf16", "gradients", "optimizer states (adamw)"):
        assert rows[name][0] == one[name] // 8, name
        assert "1/8 of it on each device (FSDP)" in rows[name][1]
    assert rows["FSDP gathered blocks"][0] > 0
    sharded = sum(rows[n][0] for n in ("weights bf16", "gradients", "optimizer states (adamw)"))
    assert sharded < est.total  # the parts no longer exceed the whole they sit beside
