"""export(): the run's merged model as one GGUF file for llama.cpp (and Ollama), checked by
llama.cpp's own runtime before it is put in place.

The file is written with the ``gguf`` package's writer and its tensor-name map: the model's
weights (q/k rows reordered to the rotary layout llama.cpp computes in), its byte-level BPE
tokenizer and its chat template. f16 and q8_0 are written directly; q4_k_m is made from the f16
file by llama.cpp's own quantizer. Then the file is loaded with llama-cpp-python and compared with
``merged/`` in transformers (float32) on the run's sealed test examples:

1. tokenization: llama.cpp must turn the test texts into the very token ids transformers does;
2. next-token log-probs: at every position of the test texts, the log-probability each side gives
   the actual next token; the largest and the mean absolute difference must stay within the
   quant type's tolerance (``TOLERANCE``);
3. greedy continuations: both sides continue the test prompts greedily; the agreement rate is
   reported, and a divergence fails the check unless transformers itself rated the two tokens
   within twice the log-prob tolerance of each other (a near-tie that rounding may flip);
4. the chat template: a test conversation rendered with the template read back from the GGUF
   metadata (as llama-cpp-python renders it) must equal the tokenizer's own rendering.

Every check runs on the file under a temporary name; only when all pass is it renamed into place
(with the Modelfile for ``--format ollama``). A failure leaves nothing at the target path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import FtcliError

FORMATS = ("gguf", "ollama")
QUANTS = ("f16", "q8_0", "q4_k_m")

# Tolerances on the log-probability (nats) the exported file gives each actual next token of the
# test texts, against merged/ in float32: (largest, mean) absolute difference.
# f16: weights keep 11 significant bits (rounding 2^-11 = 4.9e-4 relative) and llama.cpp's CPU
#   matmuls round the activations to f16 as well. Measured: tiny test Llama 0.005 / 0.0007;
#   SmolLM2-135M (30 layers, 49k vocabulary) 0.028 / 0.0018. 0.1 / 0.01 leave 3.6x / 5.6x.
# q8_0: weights (the tied embedding/head included) and the activations they multiply in blocks
#   of 32 int8 values with one scale. Measured: tiny test Llama 0.053 / 0.009; SmolLM2-135M
#   0.62 / 0.078 (its greedy divergences all near-ties). 1.5 / 0.2 leave 2.4x / 2.6x.
# q4_k_m: 4-5 bits per weight, not yet measured on SmolLM2: q8_0's scaled by ~4 (6.0 / 0.8).
# Every one still fails a broken conversion: q/k rows left in transformers' order moved the tiny
# Llama's q8_0 file by 6.5 / 0.76 nats, and tests/integration/test_export.py makes that and a
# garbled tensor and sees both caught.
TOLERANCE = {
    "f16": {"max": 0.1, "mean": 0.01},
    "q8_0": {"max": 1.5, "mean": 0.2},
    "q4_k_m": {"max": 6.0, "mean": 0.8},
}
FILE_TYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
PRE_TOKENIZERS = ("gpt-2", "smollm")
SAMPLES = 8  # test examples the check runs on
NEW_TOKENS = 16  # greedy tokens per prompt
BUILTIN_CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


# --------------------------------------------------------------------------- what goes in the file


def require_llama_cpp():
    """llama-cpp-python, or one message saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise FtcliError(
            "ftcli export checks the file with llama.cpp's runtime, and llama-cpp-python is not "
            "installed",
            hint="pip install 'ftcli[export]' (it builds llama.cpp from source: needs cmake and "
            "a C++ compiler)",
        ) from None
    return llama_cpp


def check_choices(fmt: str, quant: str) -> None:
    if fmt not in FORMATS:
        raise FtcliError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise FtcliError(f"--quant {quant!r} is not one of: {', '.join(QUANTS)}")


def check_architecture(cfg: dict, folder: Path) -> None:
    """Only what this writer maps tensor by tensor (and checks) is accepted; everything else is
    one message, before anything loads."""
    archs = cfg.get("architectures") or [cfg.get("model_type") or "unknown"]
    if archs[0] not in SUPPORTED_ARCHITECTURES or cfg.get("model_type") != "llama":
        raise FtcliError(
            f"{folder}: {archs[0]} cannot be exported to GGUF yet: ftcli writes Llama-family "
            f"models ({', '.join(SUPPORTED_ARCHITECTURES)}, e.g. SmolLM2, Llama 2)",
            hint="llama.cpp's own convert_hf_to_gguf.py converts the merged folder of other "
            "architectures (without ftcli's check)",
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise FtcliError(
            f"{folder}: rope scaling {rope_type!r} cannot be exported to GGUF yet (only the "
            "default rotary embedding is written)"
        )


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model reads it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool


def _pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it has none."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and parts[1].get("type") == "ByteLevel"
            and parts[1].get("use_regex", True)
        ):
            return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, SmolLM2)
    return None


def vocab_of(tokenizer, n_vocab: int) -> Vocab:
    """The tokenizer as a GGUF vocabulary; anything llama.cpp would tokenize differently is
    refused (the check would catch it, but the cause is clearer here)."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FtcliError(
            "the tokenizer is not a fast (tokenizers) tokenizer: ftcli exports byte-level BPE "
            "tokenizers only"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise FtcliError(
            f"the tokenizer is {model.get('type')} with a {(spec.get('decoder') or {}).get('type')} "
            "decoder: ftcli exports byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) only"
        )
    if pre is None or spec.get("normalizer"):
        raise FtcliError(
            "the tokenizer splits text in a way ftcli cannot name for llama.cpp (pre-tokenizer "
            f"{json.dumps(spec.get('pre_tokenizer'))[:120]}, normalizer "
            f"{json.dumps(spec.get('normalizer'))[:60]})",
            hint=f"ftcli knows these llama.cpp pre-tokenizers: {', '.join(PRE_TOKENIZERS)}",
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = (
            int(TokenType.CONTROL) if added.get("special") else int(TokenType.USER_DEFINED)
        )
    if max(by_id) >= n_vocab:
        raise FtcliError(
            f"the tokenizer has token ids up to {max(by_id)} but the model's embedding has "
            f"{n_vocab} rows"
        )
    tokens, kinds = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            kinds.append(types.get(i, int(TokenType.NORMAL)))
        else:  # embedding rows past the tokenizer (padded vocabularies): never produced
            tokens.append(f"[PAD{i}]")
            kinds.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Vocab(
        tokens=tokens,
        types=kinds,
        merges=merges,
        pre=pre,
        bos=bos,
        eos=eos,
        unk=tokenizer.unk_token_id,
        pad=tokenizer.pad_token_id,
        add_bos=bool(bos is not None and len(probe) > len(plain) and probe[0] == bos),
        add_eos=bool(eos is not None and len(probe) > len(plain) and probe[-1] == eos),
    )


def rotary_rows(weight, n_heads: int):
    """HF Llama stores each head's q/k rows as [first halves..., second halves...] (rotate_half);
    llama.cpp rotates adjacent pairs. Interleave the two halves of every head."""
    rows, cols = weight.shape[0], weight.shape[1:]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *cols).swapaxes(1, 2).reshape(rows, *cols)
    )


def _tensor_kind(name: str, data, quant: str):
    """(array, raw ggml type or None) of one tensor in the file's quant type: 1-D tensors (norms,
    biases) stay float32 as llama.cpp expects; q8_0 rows not a multiple of 32 fall back to f16."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1:
        return data.astype(np.float32), None
    if quant == "q8_0":
        block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
        if data.shape[-1] % block == 0:
            q = quants.quantize(data.astype(np.float32), GGMLQuantizationType.Q8_0)
            return q, GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model, tokenizer, path: Path, quant: str, name: str, template: str | None) -> None:
    """Write ``model`` (a transformers Llama) and its tokenizer to ``path`` in ``quant`` (f16 or
    q8_0) with the gguf package's writer and tensor-name map."""
    import gguf
    import numpy as np

    cfg = model.config
    n_layer = cfg.num_hidden_layers
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    state = model.state_dict()
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    vocab = vocab_of(tokenizer, n_vocab)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(FILE_TYPE[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for tid, add in (
        (vocab.bos, w.add_bos_token_id),
        (vocab.eos, w.add_eos_token_id),
        (vocab.unk, w.add_unk_token_id),
        (vocab.pad, w.add_pad_token_id),
    ):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if template:
        w.add_chat_template(template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    for key, t in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue
        out = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise FtcliError(
                f"the model holds a tensor GGUF's Llama layout has no place for: {key}",
                hint="the architecture is not plain Llama; this export cannot write it",
            )
        data = t.detach().float().cpu().numpy()
        if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias"):
            data = rotary_rows(data, n_head)
        elif key.endswith("self_attn.k_proj.weight") or key.endswith("self_attn.k_proj.bias"):
            data = rotary_rows(data, n_kv)
        arr, raw = _tensor_kind(out, np.ascontiguousarray(data), quant)
        w.add_tensor(out, arr, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def quantize_file(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer: ``src`` (an f16 GGUF) to ``dst`` in ``quant``."""
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPE[quant]
    params.nthread = _threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise FtcliError(f"llama.cpp's quantizer failed ({quant}, return code {rc})")


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- the check


def _log_softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def open_llama(path: Path, n_ctx: int):
    """The exported file in llama.cpp's runtime, with the logits of every position kept."""
    llama_cpp = require_llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=_threads(),
            logits_all=True,
            verbose=False,
            seed=0,
        )
    except (ValueError, RuntimeError) as exc:
        raise FtcliError(
            f"llama.cpp cannot load the exported file: {str(exc).splitlines()[0]}; nothing was "
            "written",
            hint="this is a bug in ftcli's GGUF writer: please report it",
        ) from None


def llama_log_probs(llm, ids: list[int]):
    """llama.cpp's log-softmax at every position of ``ids``."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return _log_softmax(np.asarray(llm.scores[: len(ids)]))


def torch_log_probs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    return _log_softmax(logits)


def llama_greedy(llm, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if tok in stop:
            break
        llm.eval([tok])
    return out


def torch_greedy(model, prompt: list[int], n: int, stop: set[int]):
    """transformers' greedy continuation and, at each step, its log-probs (to judge a divergence).
    The whole sequence is run again at each step (no cache): a few short prompts, and no
    dependence on the cache API transformers is renaming."""
    import torch

    ids = list(prompt)
    out, steps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out]), logits_to_keep=1).logits[0, -1]
            lp = _log_softmax(logits.double().numpy())
            tok = int(lp.argmax())
            out.append(tok)
            steps.append(lp)
            if tok in stop:
                break
    return out, steps


def check_logprobs(model, llm, texts_ids: list[list[int]], tol: dict) -> dict:
    """|log p(next token)| differences at every position of the test texts."""
    import numpy as np

    diffs, agree = [], []
    for ids in texts_ids:
        if len(ids) < 2:
            continue
        a = torch_log_probs(model, ids)
        b = llama_log_probs(llm, ids)
        nxt = np.asarray(ids[1:])
        pos = np.arange(len(ids) - 1)
        d = np.abs(a[pos, nxt] - b[pos, nxt])
        diffs.append(np.where(np.isfinite(d), d, np.inf))
        agree.append(a[:-1].argmax(-1) == b[:-1].argmax(-1))
    if not diffs:
        raise FtcliError("no test text long enough to compare log-probs on")
    d = np.concatenate(diffs)
    mx, mean = float(d.max()), float(d.mean())
    return {
        "positions": int(d.size),
        "max_abs_diff": mx,
        "mean_abs_diff": mean,
        "top1_agreement": float(np.concatenate(agree).mean()),
        "tolerance_max": tol["max"],
        "tolerance_mean": tol["mean"],
        "passed": bool(math.isfinite(mx) and mx <= tol["max"] and mean <= tol["mean"]),
    }


def check_greedy(model, llm, prompts: list[list[int]], n: int, stop: set[int], tol: dict) -> dict:
    """Greedy continuations on both sides: agreement rate; a divergence passes only as a near-tie
    (transformers rated the two tokens within 2x the log-prob tolerance of each other)."""
    rates, identical, ties, unexplained = [], 0, 0, []
    for i, prompt in enumerate(prompts):
        a, steps = torch_greedy(model, prompt, n, stop)
        b = llama_greedy(llm, prompt, n, stop)
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if k is None and len(a) == len(b):
            identical += 1
            rates.append(1.0)
            continue
        k = min(len(a), len(b)) if k is None else k
        rates.append(k / max(len(a), len(b)))
        if k < len(a) and k < len(b):
            gap = float(steps[k][a[k]] - steps[k][b[k]])
            if gap <= 2 * tol["max"]:
                ties += 1
                continue
            unexplained.append({"prompt": i, "at": k, "logprob_gap": gap})
        else:
            unexplained.append({"prompt": i, "at": k, "logprob_gap": None})
    return {
        "prompts": len(prompts),
        "new_tokens": n,
        "agreement": float(sum(rates) / len(rates)) if rates else 1.0,
        "identical": identical,
        "near_ties": ties,
        "unexplained": unexplained,
        "passed": not unexplained,
    }


def check_tokenizer(tokenizer, llm, texts: list[str]) -> dict:
    """llama.cpp must tokenize the texts exactly as transformers does (specials included)."""
    differ = []
    for i, text in enumerate(texts):
        ours = tokenizer(text, add_special_tokens=True)["input_ids"]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if ours != theirs:
            at = next(
                (j for j, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y),
                min(len(ours), len(theirs)),
            )
            differ.append({"text": i, "at": at})
    return {"texts": len(texts), "differ": differ, "passed": not differ}


def check_template(tokenizer, llm, conversation: list[dict] | None) -> dict:
    """The chat template read back from the GGUF, rendered as llama-cpp-python renders it, must
    give the tokenizer's own rendering of the conversation."""
    ours = getattr(tokenizer, "chat_template", None)
    stored = llm.metadata.get("tokenizer.chat_template")
    if not ours:
        return {"template": False, "passed": stored is None}
    if not conversation:
        conversation = BUILTIN_CONVERSATION
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    expected = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    if stored is None:
        return {"template": True, "stored": False, "identical": False, "passed": False}
    fmt = Jinja2ChatFormatter(
        template=stored,
        eos_token=tokenizer.eos_token or "",
        bos_token=tokenizer.bos_token or "",
        add_generation_prompt=True,
    )
    got = fmt(messages=conversation).prompt
    first = next(
        (j for j, (x, y) in enumerate(zip(expected, got, strict=False)) if x != y),
        None if len(expected) == len(got) else min(len(expected), len(got)),
    )
    return {
        "template": True,
        "stored": True,
        "messages": len(conversation),
        "identical": first is None,
        "first_difference": None if first is None else first,
        "passed": first is None,
    }


# --------------------------------------------------------------------------- Ollama


def _turns(tokenizer) -> tuple[dict[str, tuple[str, str]], str, str | None] | None:
    """The template as per-role (before, after) strings around each message's content, the
    generation prompt, and the default system prompt it adds when none is given; None when the
    template is not such a plain turn-by-turn layout (then no Ollama template is written)."""
    marks = {"system": "\x01S\x01", "user": "\x01U\x01", "assistant": "\x01A\x01"}

    def render(conv, gen=False):
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)

    conv = [{"role": r, "content": c} for r, c in marks.items()]
    try:
        full, with_gen = render(conv), render(conv, True)
        bare = render(conv[1:2])
        two = [
            {"role": "user", "content": "\x01u1\x01"},
            {"role": "assistant", "content": "\x01a1\x01"},
            {"role": "user", "content": "\x01u2\x01"},
        ]
        two_text = render(two, True)
    except Exception:  # a template that refuses a system turn, say: not a plain layout
        return None
    at = [full.find(m) for m in marks.values()]
    if min(at) < 0 or at != sorted(at) or not with_gen.startswith(full):
        return None
    s, u, a = at
    end = full[a + len(marks["assistant"]) :]
    between = (full[s + len(marks["system"]) : u], full[u + len(marks["user"]) : a])
    if not end or not all(b.startswith(end) for b in between):
        return None
    turns = {
        "system": (full[:s], end),
        "user": (between[0][len(end) :], end),
        "assistant": (between[1][len(end) :], end),
    }
    gen = with_gen[len(full) :]

    def wrap(messages):
        return "".join(turns[m["role"]][0] + m["content"] + turns[m["role"]][1] for m in messages)

    default_system = None
    if bare != wrap(conv[1:2]):
        prefix = bare[: -len(wrap(conv[1:2]))] if bare.endswith(wrap(conv[1:2])) else ""
        start, stop = turns["system"]
        if not (prefix.startswith(start) and prefix.endswith(stop) and len(prefix) > len(start)):
            return None
        default_system = prefix[len(start) : len(prefix) - len(stop)]
    lead = [{"role": "system", "content": default_system}] if default_system is not None else []
    if wrap(lead + two) + gen != two_text:
        return None
    return turns, gen, default_system


def ollama_modelfile(tokenizer, gguf_name: str, system: str | None) -> str:
    """A Modelfile: FROM the GGUF beside it, the chat template as Ollama's Go template, SYSTEM
    (the run's system prompt, else the template's own default) and the end-of-turn stop tokens."""
    parsed = _turns(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if parsed is None:
        raise FtcliError(
            "the chat template is not a plain turn-by-turn layout ftcli can translate to Ollama's "
            "template language",
            hint="export --format gguf: Ollama reads the template stored in the GGUF when it "
            "recognises it",
        )
    turns, gen, default_system = parsed
    for text in (*[p for t in turns.values() for p in t], gen, system or "", default_system or ""):
        if '"""' in text or "{{" in text:
            raise FtcliError('the chat template contains """ or {{, which a Modelfile cannot quote')
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{s}{{{{ .Content }}}}{e}'
        for i, (role, (s, e)) in enumerate(turns.items())
    )
    template = f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{gen}"
    stops = []
    end = turns["assistant"][1].strip()
    for tok in (end, tokenizer.eos_token):
        if tok and tok not in stops:
            stops.append(tok)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    system = system if system is not None else default_system
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def render_go_template(modelfile: str, messages: list[dict]) -> str:
    """What Ollama renders from this Modelfile's TEMPLATE (and SYSTEM) for ``messages``: the
    branches ftcli writes, read back, so the translation is checked against the Jinja template."""
    import re

    tmpl = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    sys_m = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S)
    body = tmpl[len("{{ range .Messages }}") :]
    body, gen = body.rsplit("{{ end }}{{ end }}", 1)
    branches = dict(
        (role, (s, e))
        for role, s, e in re.findall(
            r'\{\{ (?:if|else if) eq \.Role "(\w+)" \}\}(.*?)\{\{ \.Content \}\}(.*?)(?=\{\{ else if|\Z)',
            body,
            re.S,
        )
    )
    if sys_m and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": sys_m.group(1)}, *messages]
    return (
        "".join(branches[m["role"]][0] + m["content"] + branches[m["role"]][1] for m in messages)
        + gen
    )


# --------------------------------------------------------------------------- the command


def _folder_of(run: Path) -> tuple[Path, Path | None]:
    """(the plain transformers folder to export, the run folder around it)."""
    from ftcli.rundir import run_of

    run = Path(run)
    if not run.exists():
        raise FtcliError(
            f"{run} does not exist", hint="give a run folder, e.g. runs/smollm2-chat-lora"
        )
    if (run / "merge.json").is_file() or (
        (run / "config.json").is_file() and (run / "ftcli.json").is_file()
    ):
        return run, run_of(run)
    for sub in ("merged", "model"):
        if (run / sub / "config.json").is_file():
            return run / sub, run
    if (run / "adapter" / "adapter_config.json").is_file():
        raise FtcliError(
            f"{run} has no merged model (merged/): GGUF is written from a plain model, not an "
            "adapter",
            hint=f"merge it first: ftcli merge {run} {run / 'merged'}",
        )
    raise FtcliError(
        f"{run} holds no merged model (merged/, or model/ of a full fine-tuning run)",
        hint="give a run folder that `ftcli train` wrote, after `ftcli merge RUN RUN/merged`",
    )


def default_out(run_dir: Path | None, folder: Path, quant: str) -> Path:
    base = run_dir if run_dir is not None else folder.parent
    name = run_dir.name if run_dir is not None else folder.name
    return base / "export" / f"{name}-{quant}.gguf"


def _samples(run_dir: Path | None, tokenizer, limit: int):
    """(token ids of the test texts, their texts, greedy prompts' ids, a test conversation, where
    they came from): the run's sealed test examples, else built-in sentences."""
    from ftcli.data.tokenize import prompt_and_target, render_chat

    texts_ids, texts, prompts, conversation = [], [], [], None
    examples = []
    if run_dir is not None and (run_dir / "data" / "test.jsonl").exists():
        from ftcli.merge import run_test_features
        from ftcli.rundir import open_run

        rd = open_run(run_dir)
        examples = rd.examples[:limit]
        feats = run_test_features(run_dir, tokenizer, limit) or []
        texts_ids = [f["input_ids"] for f in feats]
    for e in examples:
        prompt, target = prompt_and_target(tokenizer, e)
        if "messages" in e:  # rendered by the template, which writes its own special tokens
            texts += [render_chat(tokenizer, e["messages"], add_generation_prompt=False), prompt]
            prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if conversation is None:
                last = max(i for i, m in enumerate(e["messages"]) if m["role"] == "assistant")
                conversation = e["messages"][:last]
        elif prompt:
            texts.append(prompt + target)
            prompts.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            texts.append(target)
            ids = tokenizer(target, add_special_tokens=True)["input_ids"]
            prompts.append(ids[: max(1, len(ids) // 2)])
    source = "test examples"
    if not texts_ids:
        from ftcli.merge import BUILTIN_SAMPLES

        source = "built-in sentences"
        texts = list(BUILTIN_SAMPLES)
        texts_ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        prompts = [ids[: max(1, len(ids) // 2)] for ids in texts_ids]
    return texts_ids, [t for t in texts if t], [p for p in prompts if p], conversation, source


def _system_prompt(run_dir: Path | None) -> str | None:
    if run_dir is None or not (run_dir / "recipe.yaml").exists():
        return None
    from ftcli.recipe import load_recipe

    return load_recipe(run_dir / "recipe.yaml").data.system_prompt


def export(
    run: str | Path,
    *,
    fmt: str = "gguf",
    quant: str = "f16",
    out: str | Path | None = None,
    force: bool = False,
    samples: int = SAMPLES,
    new_tokens: int = NEW_TOKENS,
):
    """Write RUN's merged model as a GGUF file (and, for ``ollama``, a Modelfile beside it),
    checked with llama.cpp against merged/ in transformers; returns the ExportRecord."""
    from ftcli.models import load_folder, tokenizer_from
    from ftcli.rundir import ExportRecord, read_model_record, write_export_record
    from ftcli.util import atomic_file, read_json, sha256_file

    check_choices(fmt, quant)
    t0 = time.perf_counter()
    folder, run_dir = _folder_of(Path(run))
    cfg = read_json(folder / "config.json")
    check_architecture(cfg, folder)
    rec = read_model_record(folder)
    if rec.task != "causal_lm":
        raise FtcliError(f"{folder} is a {rec.task} model: GGUF export takes causal-LM runs")
    llama_cpp = require_llama_cpp()
    target = Path(out) if out is not None else default_out(run_dir, folder, quant)
    if target.suffix.lower() != ".gguf":
        raise FtcliError(f"--out {target}: the file name must end in .gguf")
    modelfile_path = target.with_suffix(".Modelfile") if fmt == "ollama" else None
    for p in (target, modelfile_path):
        if p is not None and p.exists() and not force:
            raise FtcliError(f"{p} already exists", hint="choose another --out, or pass --force")

    tok = tokenizer_from(folder)
    model = load_folder(folder, "causal_lm", "float32")
    template = getattr(tok, "chat_template", None)
    texts_ids, texts, prompts, conversation, source = _samples(run_dir, tok, samples)
    system = _system_prompt(run_dir)
    modelfile = None
    if modelfile_path is not None:
        modelfile = ollama_modelfile(tok, target.name, system)
    name = run_dir.name if run_dir is not None else folder.name

    tol = TOLERANCE[quant]
    stop = {t for t in (tok.eos_token_id,) if t is not None}
    n_ctx = max([len(i) for i in texts_ids] + [len(p) + new_tokens for p in prompts]) + 8
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_file(target))
        if quant == "q4_k_m":
            fd, f16_name = tempfile.mkstemp(
                prefix=f".{target.stem}.f16.", suffix=".tmp", dir=target.parent
            )
            os.close(fd)
            f16 = Path(f16_name)
            stack.callback(f16.unlink, missing_ok=True)
            write_gguf(model, tok, f16, "f16", name, template)
            quantize_file(f16, tmp, quant)
        else:
            write_gguf(model, tok, tmp, quant, name, template)
        llm = open_llama(tmp, n_ctx)
        try:
            tokens = check_tokenizer(tok, llm, texts)
            logprobs = check_logprobs(model, llm, texts_ids, tol)
            greedy = check_greedy(model, llm, prompts, new_tokens, stop, tol)
            chat = check_template(tok, llm, conversation)
        finally:
            if hasattr(llm, "close"):  # llama-cpp-python >= 0.2.80: free the model now
                llm.close()
            del llm
        if modelfile is not None:
            probe = conversation or BUILTIN_CONVERSATION
            ollama_render = render_go_template(modelfile, probe)
            want = tok.apply_chat_template(
                (
                    [{"role": "system", "content": system}]
                    if system and probe[0]["role"] != "system"
                    else []
                )
                + probe,
                tokenize=False,
                add_generation_prompt=True,
            )
            chat["ollama_identical"] = ollama_render == want
            chat["passed"] = chat["passed"] and chat["ollama_identical"]
        failed = [
            what
            for what, c in (
                ("tokenization", tokens),
                ("next-token log-probs", logprobs),
                ("greedy continuations", greedy),
                ("chat template", chat),
            )
            if not c["passed"]
        ]
        record = ExportRecord(
            path=str(target),
            format=fmt,
            quant=quant,
            source=str(folder),
            base_model=str(rec.base_model),
            architecture=cfg["architectures"][0],
            modelfile=str(modelfile_path) if modelfile_path else None,
            sample_source=source,
            tokenizer_check=tokens,
            logprob_check=logprobs,
            greedy_check=greedy,
            template_check=chat,
            bytes=tmp.stat().st_size,
            sha256=sha256_file(tmp),
            seconds=round(time.perf_counter() - t0, 3),
            llama_cpp=getattr(llama_cpp, "__version__", "unknown"),
            gguf=_version("gguf"),
            passed=not failed,
        )
        if failed:
            raise FtcliError(
                f"export check failed ({', '.join(failed)}): {describe(record)}; nothing was written",
                hint="this is a bug in ftcli's GGUF writer: please report it"
                if quant != "q4_k_m"
                else "export f16 or q8_0: q4_k_m loses more than this model tolerates",
            )
        if modelfile is not None:
            mtmp = stack.enter_context(atomic_file(modelfile_path))
            mtmp.write_text(modelfile, encoding="utf-8")
    write_export_record(run_dir if run_dir is not None else folder, record)
    _update_card(folder, run_dir)
    return record


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def describe(r) -> str:
    """One line of the check's figures."""
    lp, g = r.logprob_check, r.greedy_check
    return (
        f"log-prob difference max {lp['max_abs_diff']:.3g} / mean {lp['mean_abs_diff']:.3g} nats "
        f"(tolerance {lp['tolerance_max']:g} / {lp['tolerance_mean']:g}) on {lp['positions']} "
        f"positions; greedy agreement {g['agreement']:.1%} over {g['prompts']} prompts x "
        f"{g['new_tokens']} tokens ({len(g['unexplained'])} divergences not near-ties); "
        f"tokenization {'identical' if r.tokenizer_check['passed'] else 'differs'}; chat template "
        f"{'identical' if r.template_check['passed'] else 'differs'}"
    )


def _update_card(folder: Path, run_dir: Path | None) -> None:
    """The model card of the exported folder lists every export of it and its check."""
    from ftcli.card import with_exports
    from ftcli.rundir import read_export_records
    from ftcli.util import atomic_write_text

    records = read_export_records(run_dir if run_dir is not None else folder)
    card = folder / "README.md"
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    atomic_write_text(card, with_exports(old, records))


def summary_rows(r) -> list[tuple[str, object]]:
    lp, g, t = r.logprob_check, r.greedy_check, r.template_check
    rows: list[tuple[str, object]] = [
        ("from", r.source),
        ("quant", r.quant),
        ("file", f"{r.path} ({r.bytes / 2**20:.1f} MiB)"),
    ]
    if r.modelfile:
        rows.append(("Modelfile", r.modelfile))
    rows += [
        ("tokenization", f"identical on {r.tokenizer_check['texts']} texts"),
        (
            "next-token log-probs",
            f"max |diff| {lp['max_abs_diff']:.3g}, mean {lp['mean_abs_diff']:.3g} nats "
            f"(tolerance {lp['tolerance_max']:g} / {lp['tolerance_mean']:g}) at {lp['positions']} "
            f"positions of {r.sample_source}; top-1 agrees {lp['top1_agreement']:.1%}",
        ),
        (
            "greedy",
            f"agreement {g['agreement']:.1%} over {g['prompts']} prompts x {g['new_tokens']} "
            f"tokens ({g['identical']} identical, {g['near_ties']} near-ties)",
        ),
        (
            "chat template",
            "identical rendering" if t.get("template") else "none in the tokenizer",
        ),
        ("seconds", f"{r.seconds:.1f}"),
    ]
    return rows
