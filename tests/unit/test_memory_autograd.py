"""The activation arithmetic against what autograd really keeps: a forward pass of a small real model
on the CPU, counting every tensor saved for backward (once per storage, parameters excluded)."""

from __future__ import annotations

import pytest

from ftcli.memory import plan_model
from ftcli.memory.live import LiveTensors

TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
BATCH, SEQ = 4, 48


def saved_bytes(model, batch: dict) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    assert out.loss.requires_grad
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimated_activations_match_what_autograd_saves(tiny_models, arch, method):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = "classification" if arch == "bert" else "causal_lm"
    folder = str(tiny_models[arch])
    plan = plan_model(
        folder,
        task=task,
        method=method,
        dtype="float32",
        device="cpu",
        batch_size=BATCH,
        seq_len=SEQ,
        r=4,
        dropout=0.05,
        target_modules=tuple(TARGETS[arch]) if method == "lora" else None,
    )
    acts = plan.estimate().acts
    vocab = plan.inv.dims.vocab
    expected = (
        acts.stored + acts.outside + (BATCH * SEQ * 4 * vocab if task == "causal_lm" else 0)
    )  # + log-softmax

    torch.manual_seed(0)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    if method == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.05,
                target_modules=TARGETS[arch],
                task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
            ),
        )
    model.train()
    ids = torch.randint(5, 200, (BATCH, SEQ))
    labels = torch.randint(0, 2, (BATCH,)) if task == "classification" else ids
    measured = saved_bytes(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    )
    print(
        f"{arch} {method}: estimated {expected:,} saved {measured:,} ratio {expected / measured:.3f}"
    )
    assert expected == pytest.approx(measured, rel=0.10), (expected, measured)


def test_live_tensors_counts_what_is_alive_at_once():
    """The tracker the loss-term test and bench/train_speed.py --tensor-peak rely on."""
    import torch

    w = torch.zeros(1024, 256)  # 1 MiB made before the block
    with LiveTensors(exclude=[w]) as live:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 2 MiB alive
        del a  # 1 MiB
        c = torch.ones(1024, 512)  # 3 MiB alive: the peak
        v = w.view(-1)  # a view of an excluded storage is not new memory
        del b, c
    assert live.peak == 3 * 2**20 and live.now == 0 and v.numel() == w.numel()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss_path", ["ftcli", "transformers"])
def test_the_loss_term_is_what_the_loss_holds_at_its_peak(tmp_path, loss_path, dtype):
    """The vocabulary-sized part of the peak, counted live over forward + backward of a real LoRA
    Llama at two vocabulary sizes: the full-logits transformers loss and ftcli's chunked one (2,048
    supervised positions, two 1,024-position chunks) each as the estimate models them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftcli.forward import CE_CHUNK, supervised_cross_entropy
    from ftcli.memory.setup import LOSS_CHUNK

    assert LOSS_CHUNK == CE_CHUNK
    tokens, est, got = 2048, {}, {}
    for vocab in (1024, 9216):
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        folder = tmp_path / f"v{vocab}"
        LlamaForCausalLM(cfg).save_pretrained(folder)
        plan = plan_model(
            str(folder),
            task="causal_lm",
            method="lora",
            dtype=dtype,
            device="cpu",
            batch_size=1,
            seq_len=tokens,
            r=4,
            dropout=0.0,
            target_modules=("q_proj", "v_proj"),
            loss_path=loss_path,
        )
        est[vocab] = plan.estimate().acts.loss_peak
        model = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lora)
        model.train()
        ids = torch.randint(0, vocab, (1, tokens))
        with LiveTensors() as live:
            if loss_path == "transformers":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                ce, mask = supervised_cross_entropy(model, {"input_ids": ids, "labels": ids})
                loss = ce.sum() / mask.sum()
            loss.backward()
        got[vocab] = live.peak
    estimated, measured = est[9216] - est[1024], got[9216] - got[1024]
    assert estimated == pytest.approx(measured, rel=0.05), (estimated, measured)


def test_ia3_activations_match_what_autograd_saves(tmp_path, tiny_models, tiny_data):
    """IA3's learned vectors multiply activations, and each product saves its activation for the
    vector's gradient: the estimate counts them (it did not, and read 0.74 of --measure)."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ftcli.memory import plan_recipe
    from ftcli.recipe import recipe_from_mapping
    from tests.conftest import tiny_recipe

    m = tiny_recipe(tmp_path, tiny_models, tiny_data, kind="full", arch="bert")
    m["method"] = {"kind": "ia3"}
    m["train"].update(batch_size=BATCH, device="cpu")
    m["data"]["max_length"] = SEQ
    acts = plan_recipe(recipe_from_mapping(m), "cpu").estimate().acts
    assert acts.detail["parts_per_token_per_layer"]["ia3 scaled activations"] > 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    model = get_peft_model(model, IA3Config(task_type="SEQ_CLS"))
    model.train()
    ids = torch.randint(5, 200, (BATCH, SEQ))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    measured = saved_bytes(model, {**batch, "labels": torch.randint(0, 2, (BATCH,))})
    assert acts.stored + acts.outside == pytest.approx(measured, rel=0.10)


def test_cpu_autocast_keeps_sdpa_in_float32(tiny_models):
    """Under bf16 autocast on the CPU, BERT's SDPA (math kernel: it has attention dropout) saves
    float32 tensors; the estimate once counted them in bf16 and read 0.78 of --measure."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    folder = str(tiny_models["bert"])
    kw = dict(task="classification", method="lora", dtype="float32", device="cpu", r=4)
    kw.update(batch_size=BATCH, seq_len=SEQ, dropout=0.05, target_modules=tuple(TARGETS["bert"]))
    acts = plan_model(folder, mixed_precision="bf16", **kw).estimate().acts
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=TARGETS["bert"])
    model = get_peft_model(model, lora)
    model.train()
    ids = torch.randint(5, 200, (BATCH, SEQ))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, 2, (BATCH,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_bytes(model, batch)
    expected = acts.stored + acts.outside + acts.weight_copies
    assert expected == pytest.approx(measured, rel=0.10), (expected, measured)
