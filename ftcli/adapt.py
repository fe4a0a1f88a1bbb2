"""adapt(): load the pre-trained model (fp32/bf16, 8-bit or 4-bit) and make it trainable.

``full`` trains every weight. ``lora`` freezes the base and adds W0 + (alpha/r) B A on the target
modules (A Gaussian, B zero, so training starts exactly at the base model); a new task head is
trained in full and saved with the adapter. ``qlora`` does the same on a base quantized by
bitsandbytes (NF4/FP4, double quantization, 8-bit too), on CUDA and on the CPU.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from ftcli.errors import RecipeError
from ftcli.models import HEAD_NAMES, keep_4bit_trainable_on_cpu, load_recipe_base
from ftcli.recipe import Recipe


@dataclass(frozen=True)
class ParamCounts:
    """What is trained, out of what. ``adapted_*``: the base weights LoRA wraps and its A/B params."""

    total: int
    trainable: int
    lora: int = 0
    head: int = 0
    adapted_modules: int = 0
    adapted_weights: int = 0
    examples: dict = field(
        default_factory=dict
    )  # target name -> {"shape": [out, in], "lora": n, "weights": n}

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "trainable_share": round(self.share, 6),
            "lora": self.lora,
            "head": self.head,
            "adapted_modules": self.adapted_modules,
            "adapted_weights": self.adapted_weights,
            "per_target": self.examples,
        }

    def lines(self, recipe: Recipe) -> list[str]:
        out = [
            f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.share:.3f}%, {self.total / max(1, self.trainable):,.0f}x fewer)"
        ]
        if self.adapted_modules:
            m = recipe.method
            out.append(
                f"LoRA r={m.r}, alpha={m.alpha:g} (scale {m.scale:g}) on {self.adapted_modules} modules: "
                f"{self.lora:,} weights beside {self.adapted_weights:,} frozen"
            )
            for name, ex in self.examples.items():
                o, i = ex["shape"]
                out.append(
                    f"  each {name} {i}x{o}: {ex['lora']:,} of {ex['weights']:,} weights = {m.r} x ({i} + {o})"
                )
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
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            base = module.base_layer
            w = base.weight
            n = _numel(w)
            adapted_modules += 1
            adapted_weights += n
            target = name.rsplit(".", 1)[-1]
            if target not in examples:
                out_f, in_f = (
                    getattr(base, "out_features", None),
                    getattr(base, "in_features", None),
                )
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
            problems.append(
                recipe.problem(
                    "method.target_modules",
                    f"no module named {t!r} in {type(model).__name__}; its linear modules are: {', '.join(available)}",
                    hint or "or use target_modules: all-linear",
                )
            )
    if problems:
        raise RecipeError(problems)


@dataclass
class Adapted:
    """The trainable model, its tokenizer, the base's local folder and what is trained."""

    model: object
    tokenizer: object
    model_dir: str
    counts: ParamCounts


def peft_task_type(task: str) -> str:
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def lora_config(recipe: Recipe):
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


def adapt(
    recipe: Recipe,
    tokenizer,
    model_dir: str,
    labels: list[str] | None,
    device: str,
    device_index: int = 0,
) -> Adapted:
    """Load the base model and make it trainable by the recipe's method."""
    model = load_recipe_base(recipe, model_dir, labels, tokenizer, device, device_index)
    gc = recipe.train.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    kind = recipe.method.kind
    if kind == "full":
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    else:
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
    return Adapted(model, tokenizer, model_dir, count_params(model))
