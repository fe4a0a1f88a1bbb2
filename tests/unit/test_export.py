"""The GGUF writer read back with the gguf package (no llama.cpp needed): tensor names, the q/k row
order llama.cpp rotates in, the quant types, the vocabulary and template; the refusals; the
Ollama template translation; the model card's export section and the export record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftcli.errors import FtcliError
from ftcli.export import (
    _turns,
    check_architecture,
    export,
    ollama_modelfile,
    render_go_template,
    rotary_rows,
    vocab_of,
    write_gguf,
)
from tests.conftest import CHATML

# SmolLM2-Instruct's own template: a default system turn when the conversation has none
SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def _read(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {}
    for k, f in r.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # noqa: BLE001 - a field gguf cannot decode as one value
            fields[k] = None
    return fields, {t.name: t for t in r.tensors}


def _dequantized(t) -> np.ndarray:
    from gguf import quants

    shape = tuple(reversed([int(x) for x in t.shape]))
    return quants.dequantize(t.data, t.tensor_type).reshape(shape)


def test_rotary_rows_interleaves_each_heads_halves():
    w = np.arange(8)[:, None].repeat(2, 1)  # 2 heads of 4 rows: [a0 a1 | b0 b1] per head
    assert rotary_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_file_holds_every_weight_in_llama_cpps_layout(llama, tmp_path, quant):
    model, tok = llama
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, quant, "tiny", tok.chat_template)
    fields, tensors = _read(path)
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == cfg.num_key_value_heads == 2
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[quant]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    # tied embeddings: no output.weight, llama.cpp reuses token_embd
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers
    sd = model.state_dict()
    tol = {"f16": 1e-3, "q8_0": 2e-2}[quant]
    q = _dequantized(tensors["blk.1.attn_q.weight"])
    k = _dequantized(tensors["blk.1.attn_k.weight"])
    want_q = rotary_rows(sd["model.layers.1.self_attn.q_proj.weight"].numpy(), 4)
    want_k = rotary_rows(sd["model.layers.1.self_attn.k_proj.weight"].numpy(), 2)
    assert np.abs(q - want_q).max() < tol and np.abs(k - want_k).max() < tol
    # and not in HF's order: the permutation did something
    assert np.abs(q - sd["model.layers.1.self_attn.q_proj.weight"].numpy()).max() > 10 * tol
    v = _dequantized(tensors["blk.0.attn_v.weight"])
    assert np.abs(v - sd["model.layers.0.self_attn.v_proj.weight"].numpy()).max() < tol
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == quant.upper()


def test_the_vocabulary_is_the_tokenizers(llama):
    from gguf import TokenType

    _, tok = llama
    v = vocab_of(tok, len(tok) + 3)
    vocab = tok.get_vocab()
    assert all(v.tokens[i] == t for t, i in vocab.items())
    assert v.types[tok.convert_tokens_to_ids("<|im_end|>")] == TokenType.CONTROL
    assert v.types[-1] == TokenType.UNUSED and v.tokens[-1] == f"[PAD{len(tok) + 2}]"
    assert v.pre == "gpt-2" and v.merges and " " in v.merges[0]
    assert v.add_bos is False


def test_a_wordpiece_tokenizer_is_refused(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    with pytest.raises(FtcliError, match="byte-level BPE"):
        vocab_of(tok, len(tok))


def test_other_architectures_are_refused_with_one_message(tiny_models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_models["gpt2"], run / "merged")
    (run / "merged" / "merge.json").write_text("{}")
    with pytest.raises(FtcliError) as exc:
        export(run, quant="f16")
    assert "GPT2LMHeadModel cannot be exported to GGUF" in str(exc.value)
    assert "Llama-family" in str(exc.value)
    assert not (run / "export").exists()


def test_llama3_rope_scaling_is_refused(tmp_path):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5},
    }
    with pytest.raises(FtcliError, match="rope scaling 'llama3'"):
        check_architecture(cfg, tmp_path)


def test_a_run_without_merged_says_how_to_make_it(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FtcliError) as exc:
        export(run)
    assert "no merged model" in str(exc.value) and f"ftcli merge {run}" in str(exc.value)


class _Tok:
    """Just enough of a tokenizer for the template translation: a Jinja template rendered."""

    def __init__(self, template: str, eos: str = "<|im_end|>"):
        self.chat_template = template
        self.eos_token = eos

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        import jinja2

        env = jinja2.Environment()
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 plus 3 ?"},
    ],
]


@pytest.mark.parametrize("template", [CHATML, SMOL], ids=["chatml", "smollm2"])
def test_the_ollama_template_renders_what_the_jinja_template_does(template):
    tok = _Tok(template)
    mf = ollama_modelfile(tok, "m.gguf", None)
    assert mf.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in mf
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, add_generation_prompt=True)
        assert render_go_template(mf, conv) == want
    if template == SMOL:  # its default system prompt becomes the Modelfile's SYSTEM
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf
    else:
        assert "SYSTEM" not in mf


def test_the_runs_system_prompt_is_the_modelfiles():
    mf = ollama_modelfile(_Tok(SMOL), "m.gguf", "You are terse.")
    assert 'SYSTEM """You are terse."""' in mf and "SmolLM" not in mf.split("SYSTEM")[1]


def test_a_template_that_is_not_turn_by_turn_is_not_translated():
    odd = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    assert _turns(_Tok(odd)) is None
    with pytest.raises(FtcliError, match="Ollama"):
        ollama_modelfile(_Tok(odd), "m.gguf", None)


def _record(path: str, quant: str):
    from ftcli.rundir import ExportRecord

    return ExportRecord(
        path=path,
        format="gguf",
        quant=quant,
        source="runs/x/merged",
        base_model="base",
        architecture="LlamaForCausalLM",
        modelfile=None,
        sample_source="test examples",
        tokenizer_check={"texts": 4, "differ": [], "passed": True},
        logprob_check={
            "positions": 100,
            "max_abs_diff": 0.01,
            "mean_abs_diff": 0.001,
            "top1_agreement": 1.0,
            "tolerance_max": 0.1,
            "tolerance_mean": 0.01,
            "passed": True,
        },
        greedy_check={
            "prompts": 4,
            "new_tokens": 16,
            "agreement": 1.0,
            "identical": 4,
            "near_ties": 0,
            "unexplained": [],
            "passed": True,
        },
        template_check={"template": True, "identical": True, "passed": True},
        bytes=2**20,
        sha256="0" * 64,
        seconds=1.0,
        llama_cpp="0.3.36",
        gguf="0.19.0",
        passed=True,
    )


def test_export_records_are_kept_per_file(tmp_path):
    from ftcli.rundir import read_export_records, write_export_record

    write_export_record(tmp_path, _record("a/x-f16.gguf", "f16"))
    write_export_record(tmp_path, _record("a/x-q8_0.gguf", "q8_0"))
    write_export_record(tmp_path, _record("a/x-f16.gguf", "f16"))  # re-export replaces
    recs = read_export_records(tmp_path)
    assert [r.quant for r in recs] == ["f16", "q8_0"]
    assert json.loads((tmp_path / "export" / "export.json").read_text())["exports"]


def test_the_card_section_is_replaced_not_repeated():
    from ftcli.card import with_exports

    card = "# Model\n\n## Use\n\ntext\n"
    once = with_exports(card, [_record("x-f16.gguf", "f16")])
    twice = with_exports(once, [_record("x-f16.gguf", "f16"), _record("x-q8_0.gguf", "q8_0")])
    assert once.startswith(card.rstrip("\n")) and "## Use" in twice
    assert twice.count("## GGUF exports") == 1 and "x-q8_0.gguf" in twice
    assert "| x-f16.gguf | f16 | 1.0 MiB | 0.01 / 0.001 nats" in twice


def test_pre_tokenizers_are_named_as_llama_cpp_knows_them():
    from ftcli.export import _pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert _pre_tokenizer(byte_level) == "gpt-2"
    smollm = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    assert _pre_tokenizer(smollm) == "smollm"
    assert _pre_tokenizer({"type": "Metaspace"}) is None
    assert _pre_tokenizer({**byte_level, "use_regex": False}) is None
