"""The activation arithmetic against what autograd really keeps: a forward pass of a small real model
on the CPU, counting every tensor saved for backward (once per storage, parameters excluded)."""

from __future__ import annotations

import pytest

from ftcli.memory import plan_model

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
