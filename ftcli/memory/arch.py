"""The model's architecture, from its config alone: no weights are read or downloaded.

A config comes from a local folder (config.json), a GGUF file's metadata, an architecture card
bundled in ``ftcli/bundled/cards/`` (popular models, offline), or the Hugging Face hub (cached, or online).
The model is then built on the meta device, so every parameter's shape is exact while no memory is
allocated, and LoRA is attached there by peft itself, so adapter counts are peft's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.sources import PKG, resolve_model

HEAD_LEAVES = ("lm_head", "classifier", "score", "qa_outputs")


def cards_dir() -> Path:
    """The bundled cards' folder, inside the package (ftcli/bundled/cards/)."""
    from ftcli.bundled import cards_dir as bundled_cards

    return bundled_cards()


def load_cards() -> dict[str, dict]:
    """Every bundled card: name -> config dict (with its ``ftcli_card`` entry: name and aliases)."""
    cards = {}
    for path in sorted(cards_dir().glob("*.json")):
        data = json.loads(path.read_text())
        cards[data["ftcli_card"]["name"]] = data
    return cards


def find_card(name: str) -> dict | None:
    """The card whose name or one of whose aliases is ``name`` (case-insensitive), else None."""
    key = name.strip().lower()
    for card_name, data in load_cards().items():
        if key == card_name or key in (a.lower() for a in data["ftcli_card"]["aliases"]):
            return data
    return None


@dataclass(frozen=True)
class LoadedConfig:
    config: object  # transformers.PretrainedConfig
    source: str  # "folder" | "gguf" | "card" | "hub"
    where: str  # the folder, file, card name or hub id


def config_from_card(card: dict):
    from transformers import AutoConfig

    data = {k: v for k, v in card.items() if k != "ftcli_card"}
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def load_config(
    name: str, revision: str | None = None, trust_remote_code: bool = False
) -> LoadedConfig:
    """The model's config without its weights: local folder or GGUF first, then a bundled card, then the hub."""
    from transformers import AutoConfig

    from ftcli.models import run_folder_start

    start = run_folder_start(name)  # an earlier run folder: its trained model's config
    name = str(start) if start is not None else name
    local = name.startswith(PKG) or Path(os.path.expanduser(name)).exists()
    if not local:
        card = find_card(name)
        if card is not None:
            return LoadedConfig(config_from_card(card), "card", card["ftcli_card"]["name"])
    source = resolve_model(
        name, revision
    )  # raises a clear SourceError for a hub id it cannot reach
    try:
        if source.kind == "gguf":
            path = Path(source.path) / source.gguf_file
            return LoadedConfig(gguf_config(path), "gguf", str(path))
        cfg = AutoConfig.from_pretrained(
            source.path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise FtcliError(
            f"cannot read the config of {name!r}: {exc}",
            hint="give a folder with config.json, a .gguf file, a hub id, or a bundled card "
            f"({', '.join(load_cards())})",
        ) from None
    return LoadedConfig(cfg, "folder" if source.kind == "folder" else "hub", source.path)


_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _gguf_metadata(path: Path) -> tuple[dict, list[str]]:
    """A GGUF file's scalar metadata, array lengths (``key -> ("array", n)``) and tensor names.

    Reads the header only, skipping array contents, so a 49k-token vocabulary costs milliseconds
    (gguf.GGUFReader materializes every token string: seconds). Value type codes are gguf's
    GGUFValueType: 8 = string, 9 = array."""
    import struct

    def read(f, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, f.read(size))[0]

    def string(f) -> str:
        return f.read(read(f, "<Q")).decode("utf-8", "replace")

    def skip(f, vtype: int) -> None:
        if vtype == 8:
            f.seek(read(f, "<Q"), 1)
        else:
            f.seek(struct.calcsize(_SCALAR[vtype]), 1)

    meta: dict = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise FtcliError(f"{path} is not a GGUF file (no GGUF magic)")
        version = read(f, "<I")
        if version < 2:
            raise FtcliError(
                f"{path}: GGUF version {version} is too old",
                hint="convert it with a current llama.cpp",
            )
        n_tensors, n_kv = read(f, "<Q"), read(f, "<Q")
        for _ in range(n_kv):
            key = string(f)
            vtype = read(f, "<I")
            if vtype == 8:
                meta[key] = string(f)
            elif vtype == 9:
                itype, n = read(f, "<I"), read(f, "<Q")
                meta[key] = ("array", n)
                if itype == 8:
                    for _ in range(n):
                        skip(f, 8)
                elif itype == 9:
                    raise FtcliError(f"{path}: nested GGUF arrays are not supported")
                else:
                    f.seek(n * struct.calcsize(_SCALAR[itype]), 1)
            else:
                meta[key] = read(f, _SCALAR[vtype])
        names = []
        for _ in range(n_tensors):
            names.append(string(f))
            n_dims = read(f, "<I")
            f.seek(8 * n_dims + 4 + 8, 1)  # dims, ggml type, offset
    return meta, names


def gguf_config(path: Path):
    """A transformers config from a GGUF file's metadata, mapped with transformers' own GGUF key table."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta, tensors = _gguf_metadata(path)
    arch = meta.get("general.architecture")
    table = GGUF_CONFIG_MAPPING.get(arch)
    if table is None:
        raise FtcliError(
            f"{path}: GGUF architecture {arch!r} is not one transformers can load",
            hint=f"supported: {', '.join(k for k in GGUF_CONFIG_MAPPING if k not in ('general', 'tokenizer'))}",
        )
    fields = {
        hf: meta[f"{arch}.{key}"] for key, hf in table.items() if f"{arch}.{key}" in meta and hf
    }
    tokens = meta.get("tokenizer.ggml.tokens")
    if "vocab_size" not in fields and isinstance(tokens, tuple):
        fields["vocab_size"] = tokens[1]
    fields["tie_word_embeddings"] = "output.weight" not in tensors
    model_type = {"mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2", "gemma2": "gemma2"}.get(
        arch, "llama"
    )
    heads, hidden = fields.get("num_attention_heads"), fields.get("hidden_size")
    if heads and hidden and fields.get("head_dim") == hidden // heads:
        fields.pop("head_dim")  # the default: leave it to the config
    return AutoConfig.for_model(model_type, **fields)


def infer_task(config) -> str:
    """causal_lm for decoders (a *ForCausalLM / *LMHeadModel architecture or a decoder model type), else classification."""
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return "causal_lm"
    if getattr(config, "model_type", "") in (
        "bert",
        "roberta",
        "distilbert",
        "deberta",
        "deberta-v2",
        "electra",
        "xlm-roberta",
    ):
        return "classification"
    return "causal_lm" if getattr(config, "is_decoder", False) or not archs else "classification"


def build_meta(config, task: str, num_labels: int = 2, attn_implementation: str | None = None):
    """The model for ``task`` on the meta device: exact shapes, no memory."""
    import copy

    import torch

    from ftcli.models import model_class

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):  # a GGUF's settings describe the file, not our load
        del cfg.quantization_config
    kwargs = {}
    if attn_implementation in ("eager", "sdpa"):
        kwargs["attn_implementation"] = attn_implementation
    try:
        with torch.device("meta"):
            if task in ("classification", "reward"):
                cfg.num_labels = num_labels
                if getattr(cfg, "pad_token_id", None) is None:
                    cfg.pad_token_id = 0
            return model_class(task).from_config(cfg, **kwargs)
    except (ValueError, KeyError) as exc:
        raise FtcliError(
            f"cannot build a {task} model from this config ({type(cfg).__name__}): {exc}"
        ) from None


def attach_lora_meta(
    model, task: str, r: int, alpha: float, dropout: float, target_modules, modules_to_save
):
    """peft's own LoRA on the meta model, so adapter counts are exactly what training will create."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )
    try:
        with torch.device("meta"):
            return get_peft_model(model, cfg)
    except ValueError as exc:
        raise FtcliError(
            f"LoRA cannot be attached: {exc}",
            hint="check method.target_modules against the model's linear layers",
        ) from None


@dataclass(frozen=True)
class Param:
    """One parameter as training will hold it."""

    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str  # "linear" | "embedding" | "norm" | "bias" | "other"
    trainable: bool
    lora: bool = False
    shadow: bool = False  # peft's frozen original of a modules_to_save module
    quantizable: bool = False  # a linear weight bitsandbytes would quantize
    tied_to: str | None = None


@dataclass
class Dims:
    """The numbers the activation arithmetic needs."""

    family: str  # "llama" (RMSNorm, gated MLP, RoPE) | "bert" | "gpt2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    model_type: str = ""


@dataclass
class Inventory:
    """Every parameter of the model to be trained, and its architecture's dimensions."""

    params: list[Param]
    dims: Dims
    architecture: str
    lora_targets: dict = field(
        default_factory=dict
    )  # leaf -> {"in": n, "out": n, "count": modules, "lora": params}
    # IA3: activation elements per token, all layers together, that its products save for the
    # learned vectors' gradients (a feed-forward target's input, the other targets' output)
    ia3_saved: int = 0

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params if not p.shadow)

    @property
    def base_total(self) -> int:
        """The pre-trained model's own parameters (no adapters, no shadow copies)."""
        return sum(p.numel for p in self.params if not p.shadow and not p.lora)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def largest_linear(self, quantized_only: bool = False) -> int:
        ps = [
            p.numel
            for p in self.params
            if p.kind == "linear" and not p.lora and (p.quantizable or not quantized_only)
        ]
        return max(ps, default=0)

    def layer_linear_params(self) -> int:
        """Parameters of the linear layers of one transformer block (the unit FSDP gathers)."""
        per_layer = sum(
            p.numel
            for p in self.params
            if p.kind == "linear" and not p.lora and ".0." in p.name and _block_index(p.name) == 0
        )
        return per_layer


ADAPTER_MARKS = ("lora_", "ia3_", "vera_lambda", "prompt_encoder")


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a in ("layers", "layer", "h", "blocks") and b.isdigit():
            return int(b)
    return None


def dims_of(config) -> Dims:
    """Architecture dimensions, under each family's own config names."""
    mt = getattr(config, "model_type", "")

    def g(*names, default=None):
        return next(
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
        )

    hidden = g("hidden_size", "n_embd", "d_model")
    layers = g("num_hidden_layers", "n_layer", "num_layers")
    heads = g("num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise FtcliError(
            f"the config of model type {mt!r} does not say its hidden size, layers and heads",
            hint="ftcli estimates decoder (Llama/Mistral/Qwen/Gemma/GPT-2 style) and BERT-style models",
        )
    kv = g("num_key_value_heads", default=heads)
    head_dim = g("head_dim", default=hidden // heads)
    if mt in ("bert", "roberta", "xlm-roberta", "electra"):
        family = "bert"
    elif mt in ("gpt2",):
        family = "gpt2"
    else:
        family = "llama"
    inter = g("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    return Dims(
        family=family,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=g("vocab_size"),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        gated_mlp=family == "llama",
        attn_dropout=float(
            g("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", default=0.0)
        ),
        hidden_dropout=float(g("hidden_dropout_prob", "resid_pdrop", default=0.0)),
        model_type=mt,
    )


def layer_dims(recipe) -> tuple[int, int] | None:
    """(hidden, intermediate) of a recipe's model, from its config alone: the shapes
    ``mixed_precision: auto`` times. None when the config cannot be read (the run's own load
    then says why)."""
    m = recipe.model
    try:
        d = dims_of(load_config(m.name, m.revision, m.trust_remote_code).config)
    except (FtcliError, OSError, ValueError, TypeError):
        return None
    return int(d.hidden), int(d.intermediate)


def inventory(model, config) -> Inventory:
    """Walk the (meta) model: each parameter once, with what it is and whether it trains."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_types = (torch.nn.Linear, Conv1D)
    owner: dict[str, object] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    seen: dict[int, str] = {}
    params = []
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:  # tied weights are one tensor
            continue
        seen[key] = name
        module = owner.get(name)
        leaf = name.rsplit(".", 2)[-2] if "." in name else name
        lora = any(m in name for m in ADAPTER_MARKS)  # every peft adapter weight: fp32
        if isinstance(module, linear_types) and name.endswith("weight"):
            kind = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif name.endswith("bias"):
            kind = "bias"
        elif p.ndim == 1:
            kind = "norm"
        else:
            kind = "other"
        is_head = any(h in name.split(".") for h in HEAD_LEAVES) or leaf in HEAD_LEAVES
        params.append(
            Param(
                name=name,
                numel=p.numel(),
                shape=tuple(p.shape),
                kind=kind,
                trainable=p.requires_grad,
                lora=lora,
                shadow=".original_module." in name,
                quantizable=kind == "linear"
                and not lora
                and not is_head
                and "modules_to_save" not in name,
            )
        )
    targets: dict = {}
    from peft.tuners.lora import LoraLayer

    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            leaf = _in_block(mname)
            base = module.base_layer
            in_f = getattr(base, "in_features", None) or base.weight.shape[0]
            out_f = getattr(base, "out_features", None) or base.weight.shape[1]
            n = sum(q.numel() for k, q in module.named_parameters() if "lora_" in k)
            t = targets.setdefault(
                leaf,
                {
                    "in": int(in_f),
                    "out": int(out_f),
                    "count": 0,
                    "lora": 0,
                    "dropout": _dropout_p(module),
                },
            )
            t["count"] += 1
            t["lora"] += n
    from peft.tuners.ia3 import IA3Layer

    ia3 = 0
    for module in model.modules():
        if isinstance(module, IA3Layer) and hasattr(module, "base_layer"):
            base = module.base_layer
            in_f = getattr(base, "in_features", None) or base.weight.shape[0]
            out_f = getattr(base, "out_features", None) or base.weight.shape[1]
            ia3 += int(in_f if module.is_feedforward else out_f)
    arch = type(getattr(getattr(model, "base_model", None), "model", model)).__name__
    return Inventory(
        params=params,
        dims=dims_of(config),
        architecture=arch,
        lora_targets=targets,
        ia3_saved=ia3,
    )


def _in_block(name: str) -> str:
    """``...layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: a module's path inside its block."""
    parts = name.split(".")
    for k in range(len(parts) - 1):
        if parts[k] in ("layers", "layer", "h", "blocks") and parts[k + 1].isdigit():
            return ".".join(parts[k + 2 :])
    return parts[-1]


def _dropout_p(module) -> float:
    import torch

    for d in getattr(module, "lora_dropout", {}).values():
        if isinstance(d, torch.nn.Dropout):
            return float(d.p)
    return 0.0
