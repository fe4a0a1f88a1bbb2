"""adapt(): load the pre-trained model (fp32/bf16, 8-bit or 4-bit) and make it trainable.

``full`` trains every weight. ``lora`` freezes the base and adds W0 + (alpha/r) B A on the target
modules (A Gaussian, B zero, so training starts exactly at the base model); a new task head is
trained in full and saved with the adapter. ``qlora`` does the same on a base quantized by
bitsandbytes (NF4/FP4, double quantization, 8-bit too), on CUDA and on the CPU.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ftcli.errors import FtcliError, RecipeError
from ftcli.recipe import Recipe
from ftcli.sources import ModelSource, local_model_dir, resolve_model

HEAD_NAMES = ("classifier", "score")


def resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise FtcliError("train.device is 'cuda' but no CUDA GPU is visible",
                         hint="set train.device to auto or cpu, or check CUDA_VISIBLE_DEVICES")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def to_device(model, device):
    """Move a model to ``device``, except a quantized one (bitsandbytes places its own weights)."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    return model


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(recipe: Recipe, source: ModelSource | None = None):
    """The model's tokenizer, with a pad token (decoders often have none) and right padding."""
    source = source or resolve_model(recipe.model.name, recipe.model.revision)
    model_dir = local_model_dir(source)
    tok = tokenizer_from(model_dir, what=repr(recipe.model.name), revision=recipe.model.revision,
                         trust_remote_code=recipe.model.trust_remote_code)
    return tok, source, model_dir


def tokenizer_from(folder, what: str | None = None, **kwargs):
    """A tokenizer with a pad token (decoders often have none: EOS stands in) and right padding."""
    from transformers import AutoTokenizer

    what = what or str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise FtcliError(f"cannot load the tokenizer of {what}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FtcliError(f"the tokenizer of {what} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


@dataclass(frozen=True)
class ParamCounts:
    """What is trained, out of what. ``adapted_*``: the base weights LoRA wraps and its A/B params."""

    total: int
    trainable: int
    lora: int = 0
    head: int = 0
    adapted_modules: int = 0
    adapted_weights: int = 0
    examples: dict = field(default_factory=dict)  # target name -> {"shape": [out, in], "lora": n, "weights": n}

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "trainable_share": round(self.share, 6),
                "lora": self.lora, "head": self.head, "adapted_modules": self.adapted_modules,
                "adapted_weights": self.adapted_weights, "per_target": self.examples}

    def lines(self, recipe: Recipe) -> list[str]:
        out = [f"trainable {self.trainable:,} of {self.total:,} parameters "
               f"({100 * self.share:.3f}%, {self.total / max(1, self.trainable):,.0f}x fewer)"]
        if self.adapted_modules:
            m = recipe.method
            out.append(f"LoRA r={m.r}, alpha={m.alpha:g} (scale {m.scale:g}) on {self.adapted_modules} modules: "
                       f"{self.lora:,} weights beside {self.adapted_weights:,} frozen")
            for name, ex in self.examples.items():
                o, i = ex["shape"]
                out.append(f"  each {name} {i}x{o}: {ex['lora']:,} of {ex['weights']:,} weights = {m.r} x ({i} + {o})")
        if self.head:
            out.append(f"task head trained in full: {self.head:,} parameters")
        return out


def _numel(p) -> int:
    """True parameter count; bitsandbytes packs 4-bit weights two to a byte."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        n = 1
        for s in qs.shape:
            n *= int(s)
        return n
    return p.numel()


def count_params(model) -> ParamCounts:
    total = trainable = lora = head = 0
    for name, p in model.named_parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            if "lora_" in name:
                lora += n
            elif any(f".{h}." in f".{name}" for h in HEAD_NAMES) or "modules_to_save" in name:
                head += n
    adapted_modules = adapted_weights = 0
    examples: dict = {}
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            base = module.base_layer
            w = base.weight
            n = _numel(w)
            adapted_modules += 1
            adapted_weights += n
            target = name.rsplit(".", 1)[-1]
            if target not in examples:
                out_f, in_f = getattr(base, "out_features", None), getattr(base, "in_features", None)
                if out_f is None:
                    out_f, in_f = w.shape[0], w.shape[1]
                ln = sum(p.numel() for k, p in module.named_parameters() if "lora_" in k)
                examples[target] = {"shape": [int(out_f), int(in_f)], "lora": ln, "weights": n}
    # the frozen copy of the head kept by modules_to_save is not a separate model parameter
    total -= _shadow_copies(model)
    return ParamCounts(total, trainable, lora, head, adapted_modules, adapted_weights, examples)


def _shadow_copies(model) -> int:
    """peft keeps an original copy of each modules_to_save module beside the trained one."""
    n = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            n += _numel(p)
    return n


def linear_module_names(model) -> list[str]:
    """Leaf names of the modules LoRA can wrap (Linear, GPT-2's Conv1D, bitsandbytes linears)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and name:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names and leaf not in HEAD_NAMES and leaf != "lm_head":
                names.append(leaf)
    return names


def check_targets(recipe: Recipe, model) -> None:
    """Every named target must match a linear module; say which names exist when one does not."""
    targets = recipe.method.target_modules
    if targets is None or targets == "all-linear":
        return
    available = linear_module_names(model)
    module_names = [n for n, _ in model.named_modules()]
    problems = []
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in module_names):
            close = difflib.get_close_matches(t, available, n=1, cutoff=0.4)
            hint = f"did you mean {close[0]!r}?" if close else None
            problems.append(recipe.problem(
                "method.target_modules",
                f"no module named {t!r} in {type(model).__name__}; its linear modules are: {', '.join(available)}",
                hint or "or use target_modules: all-linear"))
    if problems:
        raise RecipeError(problems)


def quantization_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.method.quant
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


def unquantized_layers(model) -> list[str]:
    """Names of 4-bit layers whose weight never got quantized (it was missing from the checkpoint)."""
    import bitsandbytes as bnb

    return [name for name, mod in model.named_modules()
            if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod.weight, "quant_state", None) is None]


def keep_4bit_trainable_on_cpu(model) -> int:
    """TRAPS.md #1: on CPUs with AVX512-BF16, the first no-grad forward makes bitsandbytes repack
    every Linear4bit into an inference-only layout, after which LoRA gradients are silently None.
    Turning the repacking off keeps the layer trainable. Returns how many layers were changed."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base_model(recipe: Recipe, model_dir: str, labels: list[str] | None, tokenizer, device: str,
                    quantized: bool | None = None, device_index: int = 0):
    """The pre-trained model with the task's head, quantized when the method asks for it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = recipe.model
    quantized = recipe.method.kind == "qlora" if quantized is None else quantized
    kwargs: dict = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if quantized:
        kwargs["quantization_config"] = quantization_config(recipe)
        kwargs["device_map"] = {"": device_index if device == "cuda" else "cpu"}
        # modules left unquantized (embeddings, head) are upcast to fp32 by prepare_model_for_kbit_training
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = torch.float32 if m.dtype == "auto" else torch_dtype(m.dtype)
    if recipe.task == "classification":
        assert labels is not None
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={lab: i for i, lab in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    try:
        model = cls.from_pretrained(model_dir, **kwargs)
        if quantized:
            fresh = unquantized_layers(model)
            if fresh:
                # Layers missing from the checkpoint (a new pooler, say) are created after quantization
                # and cannot run as 4-bit layers: keep them in full precision, with the usual skips.
                from transformers.quantizers.base import get_keys_to_not_convert

                skip = sorted(set(get_keys_to_not_convert(model)) | set(fresh))
                kwargs["quantization_config"].llm_int8_skip_modules = skip
                model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FtcliError(f"cannot load model {m.name!r} for {recipe.task}: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantized:
        keep_4bit_trainable_on_cpu(model)
    return model


@dataclass
class Adapted:
    """The trainable model, its tokenizer and what is trained."""

    model: object
    tokenizer: object
    source: ModelSource
    model_dir: str
    counts: ParamCounts
    device: str


def peft_task_type(task: str) -> str:
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    m = recipe.method
    return LoraConfig(
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        modules_to_save=list(m.modules_to_save) if m.modules_to_save else None,
        init_lora_weights="gaussian" if m.init == "gaussian" else True,
        task_type=peft_task_type(recipe.task),
        bias="none",
    )


def adapt(recipe: Recipe, tokenizer, source: ModelSource, model_dir: str, labels: list[str] | None,
          device: str, device_index: int = 0) -> Adapted:
    """Load the base model and make it trainable by the recipe's method."""
    model = load_base_model(recipe, model_dir, labels, tokenizer, device, device_index=device_index)
    gc = recipe.train.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    kind = recipe.method.kind
    if kind == "full":
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        check_targets(recipe, model)
        if kind == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
            )
        elif gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        try:
            model = get_peft_model(model, lora_config(recipe))
        except ValueError as exc:
            raise RecipeError([recipe.problem("method.target_modules", str(exc))]) from None
        if kind == "qlora":
            keep_4bit_trainable_on_cpu(model)
    if gc:
        model.config.use_cache = False
    return Adapted(model, tokenizer, source, model_dir, count_params(model), device)
