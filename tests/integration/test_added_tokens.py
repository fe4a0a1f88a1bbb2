"""model.add_tokens: the tokenizer gains the tokens, the embeddings (and an untied head) grow by
mean-initialised rows that train (peft's trainable tokens under LoRA, modules_to_save under IA3,
everything under full), the adapter carries them, merge folds them, every reload grows the base
the same way, and estimate-memory counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftcli.errors import RecipeError
from ftcli.merge import compare, logits_on, merge, sample_batches
from ftcli.recipe import recipe_from_mapping
from tests.conftest import chat_rows, tiny_recipe

TOKENS = [{"content": "<|tool|>", "special": True}, "zebrafoo"]


@pytest.fixture(scope="module")
def untied_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny pre-trained Llama with its output head as a separate copy of the embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("untied") / "llama-untied"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tool_chat(tmp_path_factory) -> Path:
    """Chats whose answers use the new tokens, so their rows get gradients."""
    rows = chat_rows(60)
    for r in rows:
        r["messages"][1]["content"] = "<|tool|> " + r["messages"][1]["content"] + " zebrafoo"
    path = tmp_path_factory.mktemp("tooldata") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mapping(root: Path, model: Path, data: Path, kind: str, method: dict | None = None) -> dict:
    m = tiny_recipe(root, {"llama": model}, {"chat": data}, task="causal_lm", kind=kind)
    m["name"] = f"tokens-{kind}"
    m["model"]["add_tokens"] = TOKENS
    m["train"].update(max_steps=4, optimizer={"name": "adamw", "lr": 2e-2})
    m["merge"] = {"enabled": False}
    if method:
        m["method"] = method
    return m


_RUNS: dict = {}


def _run(tmp_path_factory, model: Path, data: Path, kind: str, method: dict | None = None) -> Path:
    from ftcli.pipeline import train_run
    from ftcli.ui import UI

    key = (str(model), kind)
    if key not in _RUNS:
        root = tmp_path_factory.mktemp(f"tokens-{kind}")
        r = recipe_from_mapping(_mapping(root, model, data, kind, method))
        train_run(r, UI())
        _RUNS[key] = r.run_dir
    return _RUNS[key]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _base(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_the_new_rows_and_merge_folds_them(
    tmp_path_factory, tiny_models, untied_llama, tool_chat, tmp_path, tied
):
    from transformers import AutoModelForCausalLM

    from ftcli.models import load_adapters, tokenizer_from
    from ftcli.rundir import read_model_record

    model_dir = tiny_models["llama"] if tied else untied_llama
    run = _run(tmp_path_factory, model_dir, tool_chat, "lora")
    base = _base(model_dir)
    old = base.get_input_embeddings().weight.shape[0]

    # the adapter folder carries the tokens: its tokenizer has them, special stays special
    tok = tokenizer_from(run / "adapter")
    ids = tok.convert_tokens_to_ids(["<|tool|>", "zebrafoo"])
    assert ids == [old, old + 1] and len(tok) == old + 2
    enc = tok("a <|tool|> zebrafoo")["input_ids"]
    assert ids[0] in enc and ids[1] in enc
    assert "<|tool|>" not in tok.decode(enc, skip_special_tokens=True)

    # reloaded through ftcli's loader (the base grown before the adapter goes on)
    rec = read_model_record(run / "adapter")
    adapted, _ = load_adapters([("default", run / "adapter", rec)], tokenizer=tok, into="original")
    batches = sample_batches(
        tok, [{"input_ids": enc}, {"input_ids": tok("what is 1 ?")["input_ids"]}]
    )
    reference = logits_on(adapted, batches, "causal_lm")

    # merge folds them: the merged folder has the bigger vocabulary and answers like base + adapter
    m = merge(run, tmp_path / "merged")
    assert m.saved_check["passed"] and m.fold_check["passed"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == old + 2
    figures = compare(reference, logits_on(merged, batches, "causal_lm"))
    assert figures["relative_diff"] < 1e-4 and figures["prediction_agreement"] == 1.0
    merged_tok = tokenizer_from(tmp_path / "merged")
    assert merged_tok.convert_tokens_to_ids("<|tool|>") == ids[0]
    out = merged.generate(
        **merged_tok(["what is 1 plus 2 ?"], return_tensors="pt"), max_new_tokens=4
    )
    assert out.shape[1] > 0

    # the new rows trained; every other row stayed the base's (LoRA freezes the embeddings)
    mats = [
        ("embed_tokens", merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    ]
    if not tied:
        mats.append(("lm_head", merged.lm_head.weight, base.lm_head.weight))
    else:
        assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    for name, new, before in mats:
        assert torch.equal(new[:old], before), name
        mean = before.float().mean(0)
        for i in ids:
            assert (new[i] - mean).abs().max() > 1e-4, f"{name} row {i} did not train"
    saved = _weights(run / "adapter")
    emb = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    head = saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert emb.shape == (2, 32) and torch.equal(emb, head) == tied


def test_full_fine_tuning_trains_the_new_rows(tmp_path_factory, tiny_models, tool_chat):
    from transformers import AutoModelForCausalLM

    from ftcli.models import load_trained

    run = _run(tmp_path_factory, tiny_models["llama"], tool_chat, "full")
    base = _base(tiny_models["llama"])
    old = base.get_input_embeddings().weight.shape[0]
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    assert trained.config.vocab_size == old + 2
    mean = base.get_input_embeddings().weight.float().mean(0)
    new = trained.get_input_embeddings().weight
    assert all((new[i] - mean).abs().max() > 1e-4 for i in (old, old + 1))
    model, tok = load_trained(run, "causal_lm")
    assert len(tok) == old + 2 and model.get_input_embeddings().weight.shape[0] == old + 2


def test_ia3_on_tied_embeddings_trains_them_as_saved_modules(
    tmp_path_factory, tiny_models, tool_chat, tmp_path
):
    """IA3 has no trainable tokens: the embeddings train whole (modules_to_save), and the tied
    head follows the trained copy, so the merge keeps them tied and verifies."""
    method = {"kind": "ia3", "target_modules": ["q_proj", "v_proj", "down_proj"]}
    run = _run(tmp_path_factory, tiny_models["llama"], tool_chat, "ia3", method)
    saved = _weights(run / "adapter")
    assert any("embed_tokens.modules_to_save" in k for k in saved)
    m = merge(run, tmp_path / "merged")
    assert m.saved_check["passed"] and m.fold_check["passed"]
    base = _base(tiny_models["llama"])
    assert m.parameters == sum(p.numel() for p in base.parameters()) + 2 * 32


def test_a_token_already_in_the_vocabulary_warns_and_is_not_added(tiny_models, capsys):
    from ftcli.models import load_tokenizer
    from ftcli.recipe import ModelSpec

    spec = ModelSpec(name=str(tiny_models["llama"]), add_tokens=["the", "<|brandnew|>"])
    tok, _, _ = load_tokenizer(spec)
    base, _, _ = load_tokenizer(ModelSpec(name=str(tiny_models["llama"])))
    assert len(tok) == len(base) + 1
    assert tok.convert_tokens_to_ids("the") == base.convert_tokens_to_ids("the")
    err = capsys.readouterr().err
    assert "'the' is already in the vocabulary" in err and "brandnew" not in err


def test_the_data_cache_key_tells_the_added_tokens_apart(tiny_models):
    from ftcli.data.store import HashIndex, tokenizer_part
    from ftcli.models import load_tokenizer
    from ftcli.recipe import ModelSpec

    def part(tokens):
        tok, _, folder = load_tokenizer(
            ModelSpec(name=str(tiny_models["llama"]), add_tokens=tokens)
        )
        return tokenizer_part(tok, folder, HashIndex(Path(folder)))

    a, b = part(["<|a|>"]), part(["<|b|>"])
    assert a != b and part([{"content": "<|a|>", "special": True}]) != a


def test_estimate_memory_counts_the_added_rows(tiny_models, tiny_data, tmp_path):
    from ftcli.memory.plan import plan_recipe

    def figures(kind: str, n: int):
        m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm", kind=kind)
        if n:
            m["model"]["add_tokens"] = [f"<t{i}>" for i in range(n)]
        plan = plan_recipe(recipe_from_mapping(m), device="cpu")
        e = plan.estimate()
        return plan.inv, e

    hidden = 32
    for kind in ("lora", "full"):
        inv0, e0 = figures(kind, 0)
        inv1, e1 = figures(kind, 10)
        assert inv1.total - inv0.total == 10 * hidden * (2 if kind == "lora" else 1)
        assert inv1.trainable - inv0.trainable == 10 * hidden
        assert e1.gradients > e0.gradients and e1.optimizer_states > e0.optimizer_states
        assert e1.total > e0.total and inv1.dims.vocab == inv0.dims.vocab + 10


@pytest.mark.parametrize(
    ("method", "says"),
    [
        ({"kind": "prompt"}, "never train"),
        ({"kind": "full", "layers": [1]}, "method.layers"),
    ],
)
def test_combinations_where_the_rows_cannot_train_are_errors(
    tiny_models, tiny_data, tmp_path, method, says
):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm")
    m["model"]["add_tokens"] = TOKENS
    m["method"] = method
    with pytest.raises(RecipeError) as exc:
        recipe_from_mapping(m)
    text = str(exc.value)
    assert "model.add_tokens" in text and says in text


def test_a_token_listed_twice_is_an_error(tiny_models, tiny_data, tmp_path):
    m = tiny_recipe(tmp_path, tiny_models, tiny_data, task="causal_lm")
    m["model"]["add_tokens"] = ["<x>", {"content": "<x>", "special": True}]
    with pytest.raises(RecipeError, match="twice"):
        recipe_from_mapping(m)


def test_full_with_frozen_embeddings_is_an_error(tiny_models, tool_chat, tmp_path):
    from ftcli.adapt import adapt
    from ftcli.models import load_tokenizer

    m = _mapping(tmp_path, tiny_models["llama"], tool_chat, "full")
    m["method"] = {"kind": "full", "freeze": ["embed_tokens"]}
    r = recipe_from_mapping(m)
    tok, _, model_dir = load_tokenizer(r.model)
    with pytest.raises(RecipeError, match="never train"):
        adapt(r, tok, model_dir, None, "cpu")
