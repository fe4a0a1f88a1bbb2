"""The one model loader: the class by task, the device and precision, the quantization config, the
pre-trained base, and every trained folder (merged/, model/, base + adapter/).

adapt, merge, predict/chat and eval all load through here, so a QLoRA base is loaded the same way
by training and by the merge that folds its adapter, and a run folder means the same thing to
every command.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftcli import precision
from ftcli.distributed import fsdp_requested, zero3_requested
from ftcli.errors import FtcliError
from ftcli.precision import cpu_has_native_bf16 as cpu_has_native_bf16
from ftcli.recipe import QuantSpec
from ftcli.rundir import ModelRecord, read_model_record
from ftcli.sources import (
    ModelSource,
    is_run_folder,
    local_model_dir,
    remote_code,
    resolve_model,
)

HEAD_NAMES = ("classifier", "score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- device and precision


def resolve_device(choice: str = "auto") -> str:
    """The device a run uses: ``auto`` = a CUDA GPU when torch sees one, else the CPU, with a
    warning when ``nvidia-smi`` lists GPUs that this torch cannot use (so it never falls back to
    the CPU without a word)."""
    if choice in ("auto", "cuda") and not torch.cuda.is_available():
        listed = listed_gpus()
        if choice == "cuda":
            raise FtcliError(
                "train.device is 'cuda' but no CUDA GPU is visible"
                + (f" to torch ({unusable_gpus_reason(listed)})" if listed else ""),
                hint=unusable_gpus_fix()
                if listed
                else "set train.device to auto or cpu, or check CUDA_VISIBLE_DEVICES",
            )
        if listed:
            _warn_once(
                f"nvidia-smi lists {len(listed)} GPU(s) ({listed[0]}) but "
                f"{unusable_gpus_reason(listed)}: running on the CPU. {unusable_gpus_fix()}"
            )
        return "cpu"
    if choice == "auto":
        return "cuda"
    return choice


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning through ftcli's own UI (stderr, main process), once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        from ftcli.ui import UI

        UI().warn(message)


_LISTED: dict[str, list[str]] = {}


def listed_gpus(timeout_s: float = 10.0) -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (one line each), or [] when it is absent or fails; asked
    once per process (and nvidia-smi found)."""
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    if exe not in _LISTED:
        _LISTED[exe] = _ask_nvidia_smi(exe, timeout_s)
    return _LISTED[exe]


def _ask_nvidia_smi(exe: str, timeout_s: float) -> list[str]:
    import subprocess

    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("GPU ")]


def unusable_gpus_reason(listed: list[str]) -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return (
        f"this torch ({torch.__version__}, built for CUDA {torch.version.cuda}) cannot use them: "
        "the driver is likely older than that CUDA build needs"
    )


def unusable_gpus_fix() -> str:
    return (
        "Fix: rerun scripts/setup.sh (it installs the torch build the driver supports), or "
        "update the NVIDIA driver; set train.device: cpu to silence this"
    )


def weight_dtype_of(recipe, device: str) -> str:
    """The dtype a recipe's base loads in on ``device`` (``model.dtype: auto`` resolved): bf16 on a
    bf16-capable CUDA GPU when mixed precision is auto or bf16 (auto then trains in bf16), else
    float32 (ftcli.precision.auto_weight_dtype)."""
    mp = recipe.train.mixed_precision
    return precision.resolve_weight_dtype(
        recipe.model.dtype, device, "bf16" if mp == "auto" else mp, recipe.method.kind
    )


def inference_attention(choice: str | None, device: str, dtype) -> str | None:
    """The attention implementation to load a model with for inference (merge, eval, predict,
    serve): the recipe's own, except flash-attention 2 where it cannot run (it is CUDA-only and
    refuses float32): then ``sdpa``."""
    if choice != "flash_attention_2":
        return choice
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if str(device).startswith("cuda") and dtype in (torch.bfloat16, torch.float16):
        return choice
    return "sdpa"


def upcast_trainable(model) -> int:
    """Trainable half-precision parameters to float32 (a classifier head or unfrozen layers of a
    base loaded in bf16: the optimizer must step float32 weights, small updates vanish in bf16);
    peft already keeps LoRA weights in float32. Returns how many were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n


def to_device(model, device):
    """Move a model to ``device``, except a quantized one (bitsandbytes places its own weights)."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(
        model, "is_loaded_in_4bit", False
    ):
        model.to(device)
    return model


def torch_dtype(name: str):
    return DTYPES[name]


def model_class_name(task: str) -> str:
    """The transformers class a task trains: a sequence classifier (a reward model is one with a
    single logit), else a causal LM (task causal_lm, and the policy of task preference)."""
    if task in ("classification", "reward"):
        return "AutoModelForSequenceClassification"
    return "AutoModelForCausalLM"


def model_class(task: str):
    import transformers

    return getattr(transformers, model_class_name(task))


def pads_left(model) -> bool:
    """True for a decoder classifier under prompt or p-tuning: peft hands it embeddings, not ids, so
    transformers cannot find the last real token and pools the last position, which left padding
    makes a real one (right padding would pool a pad token and the classifier would learn noise)."""
    model = getattr(model, "module", model)  # under DDP
    config = getattr(model, "peft_config", None)
    if not config:
        return False
    pc = config.get(getattr(model, "active_adapter", None)) or next(iter(config.values()))
    kind = getattr(pc.peft_type, "value", pc.peft_type)
    task = getattr(pc.task_type, "value", pc.task_type)
    # decoder classifiers (Llama, Qwen, GPT-2, ...) pool the last token through a head named
    # `score`; encoders pool position 0 (the first virtual token), whatever the padding
    return (
        kind in ("PROMPT_TUNING", "P_TUNING")
        and task == "SEQ_CLS"
        and hasattr(model.get_base_model(), "score")
    )


def forward_takes(model_dir: str, task: str, arguments: tuple[str, ...], trust_remote_code=False):
    """(class name, whether its forward takes one of ``arguments``), from the config alone: no
    weights load."""
    import inspect

    from transformers import AutoConfig

    trust = remote_code(trust_remote_code, f"model {model_dir!r}")
    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    try:
        cls = model_class(task)._model_mapping[type(cfg)]
    except KeyError:
        return type(cfg).__name__, True  # remote code or unknown: let peft decide
    params = inspect.signature(cls.forward).parameters
    return cls.__name__, any(a in params for a in arguments)


# --------------------------------------------------------------------------- tokenizers


def tokenizer_from(folder, what: str | None = None, **kwargs):
    """A tokenizer with a pad token (decoders often have none: EOS stands in) and right padding."""
    from transformers import AutoTokenizer

    what = what or str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise FtcliError(
            f"cannot load the tokenizer of {what}: {str(exc).splitlines()[0]}"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FtcliError(f"the tokenizer of {what} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def run_folder_start(name: str) -> Path | None:
    """``model.name`` naming an earlier ftcli run folder (``runs/sft``): the trained weights to
    start from, its merged/ or model/ folder (checked against their recorded hashes); None when
    ``name`` is not a run folder. An adapter-only run is refused with the fix: its merged folder
    is the start (base and adapter folded once, so the reference is that model, too)."""
    import os

    path = Path(os.path.expanduser(name))
    if not is_run_folder(path):
        return None
    kind, folder = trained_folder(path)
    if kind == "adapter":
        raise FtcliError(
            f"{name} holds an adapter only: a run started from it needs the weights merged",
            hint=f"ftcli merge {name} (then model.name: {name} starts from its merged/ folder)",
        )
    verify_trained(folder)
    return folder


def load_tokenizer(model_spec):
    """(tokenizer, source, local folder) of a recipe's ``model`` section, with the tokens
    ``model.add_tokens`` names added; an earlier run folder stands for its trained weights
    (``run_folder_start``)."""
    start = run_folder_start(model_spec.name)
    if start is not None:
        tok = tokenizer_from(start, what=repr(model_spec.name))
        source, model_dir = ModelSource(model_spec.name, "folder", str(start)), str(start)
    else:
        source = resolve_model(model_spec.name, model_spec.revision)
        model_dir = local_model_dir(source)
        tok = tokenizer_from(
            model_dir,
            what=repr(model_spec.name),
            revision=model_spec.revision,
            trust_remote_code=remote_code(model_spec.trust_remote_code, repr(model_spec.name)),
        )
    if model_spec.add_tokens:
        add_tokens(tok, model_spec.added_tokens, repr(model_spec.name))
    return tok, source, model_dir


# --------------------------------------------------------------------------- added tokens


def add_tokens(tokenizer, entries, what: str, warn: bool = True) -> dict[str, int]:
    """Add ``entries`` (AddedTokenSpec) to ``tokenizer`` in their order; {content: id} of those
    it gained. A token already in the vocabulary is not added twice: one warning line names it.
    The tokenizer keeps what was asked in ``ftcli_added_tokens`` (the data cache's key reads it)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    present = [e.content for e in entries if e.content in vocab]
    if present and warn:
        _warn_once(
            f"model.add_tokens: {', '.join(map(repr, present))} "
            f"{'is' if len(present) == 1 else 'are'} already in the vocabulary of {what}: "
            "not added again (the existing token and its trained row are used)"
        )
    new = [e for e in entries if e.content not in vocab]
    tokenizer.add_tokens(
        [AddedToken(e.content, special=e.special, normalized=not e.special) for e in new]
    )
    tokenizer.ftcli_added_tokens = [[e.content, e.special] for e in entries]
    ids = {e.content: tokenizer.convert_tokens_to_ids(e.content) for e in new}
    if len(set(ids.values())) != len(new) or any(i is None for i in ids.values()):
        raise FtcliError(f"the tokenizer of {what} did not take the tokens {sorted(ids)}")
    return ids


_NEW_ROWS: dict[tuple, tuple[dict[str, int], int]] = {}


def new_token_rows(model_spec, model_dir: str) -> tuple[dict[str, int], int]:
    """({content: id} of the tokens ``model.add_tokens`` adds to the base's own tokenizer, the
    base tokenizer's size): what training grew, worked out again from the base so that every
    later load grows the same rows (the tokenizer saved with an adapter is checked against it)."""
    entries = model_spec.added_tokens
    key = (str(model_dir), model_spec.revision, tuple((e.content, e.special) for e in entries))
    if key not in _NEW_ROWS:
        tok = tokenizer_from(
            model_dir,
            what=repr(model_spec.name),
            revision=model_spec.revision,
            trust_remote_code=remote_code(model_spec.trust_remote_code, repr(model_spec.name)),
        )
        size = len(tok)
        _NEW_ROWS[key] = (add_tokens(tok, entries, repr(model_spec.name), warn=False), size)
    return _NEW_ROWS[key]


def token_matrices(model) -> list:
    """The vocabulary-sized weights a new token needs a row in: the input embeddings, and the
    output head where it is a separate (untied) matrix."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mats = [emb]
    if (
        out is not None
        and getattr(out, "weight", None) is not None
        and out.weight is not emb.weight
        and out.weight.shape[0] == emb.weight.shape[0]
    ):
        mats.append(out)
    return mats


def grow_for_tokens(model, ids: list[int], base_size: int) -> None:
    """Resize the embeddings (and an untied output head) to hold rows ``ids`` and set each of
    those rows to the mean of the base vocabulary's rows: a new token starts as the average
    token, not as noise that would dominate the first steps (transformers' own mean_resizing
    samples around the mean at random, so a reload could not rebuild it)."""
    if not ids:
        return
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) + 1 > rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    keep = min(base_size, rows)  # a padded vocabulary's spare rows are not the vocabulary's
    with torch.no_grad():
        for layer in token_matrices(model):
            w = layer.weight
            w[ids] = w[:keep].float().mean(0).to(w.dtype)


def tie_saved_embeddings(model) -> bool:
    """A tied output head follows the input embeddings when peft trains them as a
    modules_to_save copy (ia3/vera with model.add_tokens): peft copies the embeddings only, and
    the head would keep the frozen original. Re-pointed at training and at every load."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    emb, out = base.get_input_embeddings(), base.get_output_embeddings()
    copies = getattr(emb, "modules_to_save", None)
    if out is None or not copies:
        return False
    out.weight = copies[emb.active_adapters[0]].weight
    return True


def check_token_ids(tokenizer, rows: dict[str, int], what: str) -> None:
    """The tokenizer a model is used with must give the added tokens the rows the model grew."""
    wrong = [c for c, i in rows.items() if tokenizer.convert_tokens_to_ids(c) != i]
    if wrong:
        raise FtcliError(
            f"the tokenizer used with {what} does not give the added token(s) "
            f"{', '.join(map(repr, wrong))} the ids model.add_tokens gave them",
            hint="use the tokenizer saved beside the adapter (or the run's recipe unchanged)",
        )


# --------------------------------------------------------------------------- quantization


def quantization_config(q: QuantSpec, compute_dtype: str | None = None):
    """bitsandbytes settings of a QuantSpec; ``compute_dtype`` overrides the spec's (the merge
    computes in float32)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = torch_dtype(compute_dtype or q.compute_dtype)
    extra = {}
    if fsdp_requested() or zero3_requested():  # ZeRO-3 partitions them the same way
        # FSDP flattens the 4-bit weights with the float ones: stored as uint8 (the default) they
        # silently corrupt training (loss 0.0, grad_norm NaN; docs/traps.md#qlora-under-fsdp)
        extra["bnb_4bit_quant_storage"] = dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        **extra,
    )


def unquantized_layers(model) -> list[str]:
    """Names of 4-bit layers whose weight never got quantized (it was missing from the checkpoint)."""
    import bitsandbytes as bnb

    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod.weight, "quant_state", None) is None
    ]


def keep_4bit_trainable_on_cpu(model) -> int:
    """On CPUs with AVX512-BF16, the first no-grad forward makes bitsandbytes repack
    every Linear4bit into an inference-only layout, after which LoRA gradients are silently None.
    Turning the repacking off keeps the layer trainable (docs/traps.md#cpu-qlora-repacking).
    Returns how many layers were changed."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(
            module, "support_avx512bf16_for_cpu", False
        ):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


# --------------------------------------------------------------------------- the base model


def use_mlp_head(model, hidden: int, dropout: float):
    """Replace a classifier's linear head by Linear -> GELU -> Dropout -> Linear (issue 9), and
    record it in the config so every later load rebuilds the same module (``mlp_head_of``)."""
    for name in HEAD_NAMES:
        old = getattr(model, name, None)
        if isinstance(old, torch.nn.Linear):
            new = torch.nn.Sequential(
                torch.nn.Linear(old.in_features, hidden),
                torch.nn.GELU(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, old.out_features),
            )
            setattr(model, name, new.to(old.weight.device, old.weight.dtype))
            model.config.ftcli_head = {"hidden": hidden, "dropout": dropout}
            return model
    raise FtcliError(
        f"{type(model).__name__} has no linear head named {' or '.join(HEAD_NAMES)} to replace",
        hint="remove model.head: this architecture keeps its own head",
    )


def mlp_head_of(config) -> dict | None:
    head = getattr(config, "ftcli_head", None)
    return head if isinstance(head, dict) else None


def _load_saved_head(model, folder: Path) -> None:
    """A saved MLP head's weights (plain transformers built a linear one and skipped them)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    found = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key in params and any(key.startswith(h + ".") for h in HEAD_NAMES):
                    with torch.no_grad():
                        params[key].copy_(f.get_tensor(key).to(params[key].dtype))
                    found += 1
    head = [k for k in params if any(k.startswith(h + ".") for h in HEAD_NAMES)]
    if found != len(head):
        raise FtcliError(
            f"{folder} records an MLP head but holds {found} of its {len(head)} tensors",
            hint="the folder is damaged; rerun the merge or the training",
        )


def label_kwargs(labels: list[str] | None, tokenizer) -> dict:
    """The head's size and label names, for a classification model."""
    if labels is None:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "pad_token_id": tokenizer.pad_token_id,
    }


def load_base_model(
    model_dir: str,
    task: str,
    labels: list[str] | None,
    tokenizer,
    *,
    quant: QuantSpec | None = None,
    compute_dtype: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_index: int = 0,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    what: str | None = None,
    head=None,
    model_spec=None,
):
    """The pre-trained model with the task's head (an MLP one when ``head``, a HeadSpec, is given);
    quantized (bitsandbytes) when ``quant`` is given. Layers missing from the checkpoint (a new
    pooler, say) are kept in full precision. ``model_spec`` (a ModelSpec) with ``add_tokens``:
    the embeddings grow by the added tokens' rows (``grow_for_tokens``)."""
    if task == "classification" and labels is None:
        raise FtcliError("a classification model needs its labels")
    trust = remote_code(trust_remote_code, f"model {what or model_dir!r}")
    kwargs: dict = {"revision": revision, "trust_remote_code": trust}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qc = None
    if quant is not None:
        qc = quantization_config(quant, compute_dtype)
        kwargs["quantization_config"] = qc
        if not zero3_requested():  # ZeRO-3 places the shards itself and refuses a device_map
            kwargs["device_map"] = {"": device_index if device == "cuda" else "cpu"}
        # modules left unquantized (embeddings, head) are upcast to fp32 by prepare_model_for_kbit_training
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = torch.float32 if dtype == "auto" else torch_dtype(dtype)
    kwargs.update(label_kwargs(labels if task == "classification" else None, tokenizer))
    if task == "reward":  # one logit: the score the pairwise loss compares
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    cls = model_class(task)
    try:
        model = cls.from_pretrained(model_dir, **kwargs)
        if qc is not None:
            fresh = unquantized_layers(model)
            if fresh:
                # created after quantization, these cannot run as 4-bit layers: keep them full precision
                from transformers.quantizers.base import get_keys_to_not_convert

                qc.llm_int8_skip_modules = sorted(set(get_keys_to_not_convert(model)) | set(fresh))
                model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FtcliError(f"cannot load model {what or model_dir!r} for {task}: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if qc is not None:
        keep_4bit_trainable_on_cpu(model)
    if model_spec is not None and model_spec.add_tokens:
        rows, size = new_token_rows(model_spec, model_dir)
        check_token_ids(tokenizer, rows, repr(what or model_dir))
        grow_for_tokens(model, sorted(rows.values()), size)
    if head is not None and task == "classification":
        use_mlp_head(model, head.hidden, head.dropout)
    return model


def load_recipe_base(recipe, model_dir: str, labels, tokenizer, device: str, device_index: int = 0):
    """The base exactly as a recipe trains it (quantized for QLoRA)."""
    m = recipe.model
    return load_base_model(
        model_dir,
        recipe.task,
        labels,
        tokenizer,
        quant=recipe.method.quant if recipe.method.kind == "qlora" else None,
        dtype=weight_dtype_of(recipe, device),
        device=device,
        device_index=device_index,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        what=m.name,
        head=m.head,
        model_spec=m,
    )


def load_reference(recipe, model_dir: str, tokenizer, device: str, device_index: int = 0):
    """The frozen reference model of a preference run that is not the policy with its adapter
    disabled: ``preference.reference`` start (the weights the run starts from, loaded again:
    full fine-tuning), a run folder (its trained model) or a model name; in eval mode, no
    gradients, in the dtype the recipe loads its base in."""
    ref = recipe.preference.reference
    if ref == "start":
        target = model_dir
    else:
        start = run_folder_start(ref)
        target = str(start) if start is not None else local_model_dir(resolve_model(ref))
    quant = recipe.method.quant if recipe.method.kind == "qlora" else None
    model = load_base_model(
        target,
        "causal_lm",
        None,
        tokenizer,
        quant=quant,
        dtype=weight_dtype_of(recipe, device),
        device=device,
        device_index=device_index,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
        what=f"preference.reference {ref}",
    )
    model.requires_grad_(False)
    return to_device(model, device).eval()


def base_dir(rec: ModelRecord, base: str | None = None) -> str:
    """The local folder of an adapter's base: ``base`` if given, else the one its record names."""
    spec = base or rec.base_model
    if not spec:
        raise FtcliError("the adapter does not record its base model", hint="name it with --base")
    try:
        return local_model_dir(resolve_model(spec, rec.revision if base is None else None))
    except FtcliError:
        recorded = rec.base_model_dir
        if base is None and recorded and Path(recorded).is_dir():
            return recorded
        raise


INTO = ("dequantized", "original", "quantized", "as-trained")


def load_base_for(rec: ModelRecord, model_dir: str, into: str, tokenizer, device: str = "cpu"):
    """The base an adapter attaches to. For QLoRA: ``dequantized`` (float32 copies of the NF4
    weights training used: what a merge folds into), ``quantized`` (4-bit, float32 compute: the
    merge's reference), ``as-trained`` (4-bit with the recipe's compute dtype, as training ran);
    ``original`` (and every LoRA base): the pre-trained weights, in the dtype training loaded."""
    if rec.task == "classification" and not rec.labels:
        raise FtcliError(
            "the adapter does not record its labels (ftcli.json)",
            hint="use an adapter ftcli trained",
        )
    labels = rec.labels if rec.task == "classification" else None
    spec = rec.model
    quantized = rec.kind == "qlora" and into != "original"
    if quantized:
        loads_as = rec.quant.compute_dtype if into == "as-trained" else "float32"
    else:
        # as-trained: the dtype training loaded (auto: bf16 on a CUDA GPU with bf16); else float32
        loads_as = spec.dtype if spec and into == "as-trained" else "float32"
        if loads_as == "auto":
            bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            loads_as = "bfloat16" if bf16 and rec.kind != "full" else "float32"
    common = {
        "revision": rec.revision,
        "trust_remote_code": bool(spec and spec.trust_remote_code),
        "attn_implementation": inference_attention(
            spec.attn_implementation if spec else None, device, loads_as
        ),
        "what": rec.base_model,
        "head": spec.head if spec else None,
        "model_spec": spec,
    }
    if quantized:
        compute = rec.quant.compute_dtype if into == "as-trained" else "float32"
        model = load_base_model(
            model_dir,
            rec.task,
            labels,
            tokenizer,
            quant=rec.quant,
            compute_dtype=compute,
            device=device,
            **common,
        )
        if into == "dequantized":
            model = model.dequantize(dtype=torch.float32)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
    else:
        model = load_base_model(model_dir, rec.task, labels, tokenizer, dtype=loads_as, **common)
    return model.eval()


# --------------------------------------------------------------------------- trained folders


def verify_trained(folder: Path, rec: ModelRecord | None = None) -> None:
    """A folder ftcli wrote (adapter/ or model/ with ftcli.json, merged/ with merge.json) is loaded
    only if its weights hash as recorded there; a record that leaves the hashes out is refused
    (it was edited, or is not ftcli's), not trusted by default."""
    from ftcli.rundir import read_merge_record
    from ftcli.util import check_hashes

    folder = Path(folder)
    if (folder / "merge.json").exists():
        record, hashes, what = "merge.json", read_merge_record(folder).sha256, "merged folder"
    elif rec is not None or (folder / "ftcli.json").exists():
        rec = rec or read_model_record(folder)
        if not (folder / "ftcli.json").exists():
            return  # a folder ftcli did not write: its record was completed from peft's own
        record, hashes, what = "ftcli.json", rec.sha256, "trained folder"
    else:
        return
    if not hashes:
        raise FtcliError(
            f"{folder}/{record} records no sha256 of the weights, so they cannot be checked "
            "before loading",
            hint="use a folder as ftcli wrote it (rerun `ftcli merge` or the training run)",
        )
    check_hashes(folder, hashes, what)


def load_folder(folder: Path, task: str, dtype: str = "float32"):
    """A plain transformers folder (merged/, model/, any export), ready for inference."""
    verify_trained(folder)
    try:
        model = model_class(task).from_pretrained(folder, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise FtcliError(
            f"cannot load {folder}: {str(exc).splitlines()[0]}",
            hint="the folder is damaged; rerun the merge (ftcli merge) or the training",
        ) from None
    head = mlp_head_of(model.config)
    if head is not None:
        use_mlp_head(model, head["hidden"], head["dropout"])
        _load_saved_head(model, folder)
    return model.eval()


def attach_adapter(base_model, folder: Path, name: str = "default"):
    """A peft model: ``base_model`` with the adapter saved in ``folder``, for inference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, folder, adapter_name=name)
    if _adds_tokens(folder):  # as training tied them (adapt does the same, for these runs only)
        tie_saved_embeddings(model)
    return model.eval()


def _adds_tokens(folder: Path) -> bool:
    """Whether ftcli's record of the adapter in ``folder`` names model.add_tokens."""
    if not (Path(folder) / "ftcli.json").exists():
        return False
    spec = read_model_record(Path(folder)).model
    return bool(spec and spec.add_tokens)


def load_adapters(
    adapters: list[tuple[str, Path, ModelRecord]],
    base: str | None = None,
    tokenizer=None,
    into: str = "dequantized",
):
    """One base model, loaded once, with every (name, folder, record) adapter attached by name;
    the first is active. Returns (model, tokenizer)."""
    name0, path0, first = adapters[0]
    for _, p, rec in adapters:
        verify_trained(p, rec)
    tok = tokenizer or tokenizer_from(path0)
    model_dir = base_dir(first, base)
    model = load_base_for(first, model_dir, into, tok, resolve_device("auto"))
    try:
        model = attach_adapter(model, path0, name0)
        for n, p, _ in adapters[1:]:
            model.load_adapter(p, adapter_name=n)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FtcliError(
            f"cannot load the adapter(s) onto {base or first.base_model}: {str(exc).splitlines()[0]}",
            hint="the folder is damaged, or name the base it was trained on",
        ) from None
    model.set_adapter(name0)
    return model.eval(), tok


def trained_folder(run_dir: Path) -> tuple[str, Path]:
    """Which trained model a run folder holds: ("merged"|"model", folder) or ("adapter", folder)."""
    for sub in ("merged", "model"):
        if (run_dir / sub / "config.json").exists():
            return sub, run_dir / sub
    if (run_dir / "adapter" / "adapter_config.json").exists():
        return "adapter", run_dir / "adapter"
    raise FtcliError(
        f"{run_dir} holds no trained model (merged/, model/ or adapter/)",
        hint="finish the run first: ftcli train <recipe> --resume",
    )


def load_trained(run_dir: Path, task: str | None = None):
    """The fine-tuned model of a run folder (merged/, model/ or base + adapter/) and its tokenizer."""
    kind, folder = trained_folder(Path(run_dir))
    tok = tokenizer_from(folder)
    if kind == "adapter":
        rec = read_model_record(folder)
        return load_adapters([("default", folder, rec)], tokenizer=tok, into="as-trained")
    return load_folder(folder, task or read_model_record(folder).task), tok
