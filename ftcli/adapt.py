"""adapt(): load the pre-trained model (fp32/bf16, 8-bit or 4-bit) and make it trainable.

``full`` trains every weight (or only ``method.layers``, less ``method.freeze``). ``lora`` freezes
the base and adds W0 + (alpha/r) B A on the target modules (A Gaussian, B zero, so training starts
exactly at the base model; DoRA, rsLoRA and the pissa/olora/loftq/eva initialisations through
peft); a new task head is trained in full and saved with the adapter. ``qlora`` does the same on a
base quantized by bitsandbytes (NF4/FP4, double quantization, 8-bit too), on CUDA and on the CPU.
``ia3``, ``vera``, ``prefix``, ``prompt`` and ``ptuning`` are peft's configs of those names.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import (
    EvaConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.tuners.vera import VeraLayer
from transformers.pytorch_utils import Conv1D

from ftcli.errors import FtcliError, RecipeError
from ftcli.models import (
    HEAD_NAMES,
    forward_takes,
    keep_4bit_trainable_on_cpu,
    load_recipe_base,
    upcast_trainable,
)
from ftcli.recipe import LORA_KINDS, PROMPT_KINDS, Recipe
from ftcli.strategies import block_of, learning_rate, num_blocks

ADAPTER_MARKS = ("lora_", "ia3_", "vera_lambda", "prompt_encoder")
CONVERTED_INITS = ("pissa", "olora")  # rewrite the base: the saved adapter is converted back
INIT_ADAPTER = Path("init") / "adapter"


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
    adapter: int = 0  # every trainable adapter weight (LoRA, IA3 scales, VeRA vectors, prompts)
    extra: tuple = ()  # method-specific arithmetic lines (virtual tokens, frozen patterns)

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
            "adapter": self.adapter,
            "per_target": self.examples,
        }

    def lines(self, recipe: Recipe) -> list[str]:
        out = [
            f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.share:.3f}%, {self.total / max(1, self.trainable):,.0f}x fewer)"
        ]
        m = recipe.method
        if self.adapted_modules and m.kind in LORA_KINDS:
            variant = "".join(
                [" DoRA" if m.dora else "", " rsLoRA" if m.rslora else "", f" init {m.init}"]
            )
            scale = f"alpha/sqrt(r) = {m.scale:g}" if m.rslora else f"scale {m.scale:g}"
            out.append(
                f"LoRA{variant} r={m.r}, alpha={m.alpha:g} ({scale}) on {self.adapted_modules} "
                f"modules: {self.lora:,} weights beside {self.adapted_weights:,} frozen"
            )
            for name, ex in self.examples.items():
                o, i = ex["shape"]
                dora = f" + {o} magnitudes" if m.dora else ""
                out.append(
                    f"  each {name} {i}x{o}: {ex['lora']:,} of {ex['weights']:,} weights "
                    f"= {m.r} x ({i} + {o}){dora}"
                )
        elif self.adapted_modules and m.kind == "ia3":
            out.append(
                f"IA3 on {self.adapted_modules} modules: {self.adapter:,} learned scales beside "
                f"{self.adapted_weights:,} frozen weights"
            )
            for name, ex in self.examples.items():
                o, i = ex["shape"]
                side = "input" if ex.get("feedforward") else "output"
                out.append(
                    f"  each {name} {i}x{o}: {ex['lora']:,} of {ex['weights']:,} weights "
                    f"= one scale per {side} feature"
                )
        elif self.adapted_modules and m.kind == "vera":
            out.append(
                f"VeRA r={m.r} on {self.adapted_modules} modules: {self.adapter:,} trained "
                f"vectors; the random projections A, B are shared and frozen"
            )
            for name, ex in self.examples.items():
                o, i = ex["shape"]
                out.append(
                    f"  each {name} {i}x{o}: {ex['lora']:,} of {ex['weights']:,} weights "
                    f"= {o} (b) + {m.r} (d)"
                )
        out.extend(self.extra)
        if self.head:
            mlp = recipe.model.head
            how = f" (MLP head, hidden {mlp.hidden})" if mlp else ""
            out.append(f"task head trained in full{how}: {self.head:,} parameters")
        lr, source = learning_rate(recipe)
        out.append(f"learning rate {lr:g} ({source})")
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


def count_params(model, extra: tuple = ()) -> ParamCounts:
    total = trainable = lora = head = adapter = 0
    for name, p in model.named_parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            if any(mark in name for mark in ADAPTER_MARKS):
                adapter += n
            if "lora_" in name:
                lora += n
            elif any(f".{h}." in f".{name}" for h in HEAD_NAMES) or "modules_to_save" in name:
                head += n
    adapted_modules = adapted_weights = 0
    examples: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer | IA3Layer | VeraLayer) and hasattr(module, "base_layer"):
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
                ln = sum(
                    p.numel()
                    for k, p in module.named_parameters()
                    if any(mark in k for mark in ADAPTER_MARKS)
                )
                examples[target] = {"shape": [int(out_f), int(in_f)], "lora": ln, "weights": n}
                if getattr(module, "is_feedforward", False):
                    examples[target]["feedforward"] = True
    # the frozen copy of the head kept by modules_to_save is not a separate model parameter
    total -= _shadow_copies(model)
    return ParamCounts(
        total,
        trainable,
        lora,
        head,
        adapted_modules,
        adapted_weights,
        examples,
        adapter,
        tuple(extra),
    )


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
    """peft's task type: a sequence classifier (a reward model too: its score head is trained in
    full and saved with the adapter) or a causal LM (a preference policy too)."""
    return "SEQ_CLS" if task in ("classification", "reward") else "CAUSAL_LM"


def _layers(recipe: Recipe) -> dict:
    return {"layers_to_transform": list(recipe.method.layers)} if recipe.method.layers else {}


def lora_config(recipe: Recipe):
    m = recipe.method
    init = {"gaussian": "gaussian", "kaiming": True, "loftq": True}.get(m.init, m.init)
    extra: dict = {}
    if m.init == "eva":
        # classification labels are one id per example, not per token: no label mask then
        extra["eva_config"] = EvaConfig(use_label_mask=recipe.task == "causal_lm")
    return LoraConfig(
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        modules_to_save=list(m.modules_to_save) if m.modules_to_save else None,
        init_lora_weights=init,
        use_dora=m.dora,
        use_rslora=m.rslora,
        task_type=peft_task_type(recipe.task),
        bias="none",
        **_layers(recipe),
        **extra,
    )


def peft_config(recipe: Recipe, model):
    """The peft config of the recipe's method (every adapter goes through peft)."""
    m = recipe.method
    task_type = peft_task_type(recipe.task)
    save = list(m.modules_to_save) if m.modules_to_save else None
    if m.kind in LORA_KINDS:
        return lora_config(recipe)
    if m.kind == "ia3":
        ff = None
        if isinstance(m.target_modules, list):
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

            known = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(
                model.config.model_type, []
            )
            ff = [t for t in m.target_modules if t in known]
        return IA3Config(
            target_modules=m.target_modules,
            feedforward_modules=ff,
            modules_to_save=save,
            task_type=task_type,
            **_layers(recipe),
        )
    if m.kind == "vera":
        return VeraConfig(
            r=m.r,
            target_modules=m.target_modules,
            vera_dropout=m.dropout,
            modules_to_save=save,
            projection_prng_key=recipe.train.seed,
            save_projection=True,
            task_type=task_type,
            **_layers(recipe),
        )
    cls = {
        "prefix": PrefixTuningConfig,
        "prompt": PromptTuningConfig,
        "ptuning": PromptEncoderConfig,
    }[m.kind]
    return cls(num_virtual_tokens=m.virtual_tokens, task_type=task_type)


def check_supported(recipe: Recipe, model_dir: str) -> None:
    """Prefix tuning feeds learned keys/values as past_key_values; transformers 5's encoders
    (BERT, MiniLM) take none. Said before the weights load."""
    if recipe.method.kind != "prefix":
        return
    if recipe.task in ("classification", "reward"):
        # peft's classifier path looks for a parameter named past_key_values and raises at the
        # first forward otherwise; transformers 5 decoders name theirs ``cache``
        name, ok = forward_takes(
            model_dir, recipe.task, ("past_key_values",), recipe.model.trust_remote_code
        )
        if not ok:
            raise RecipeError(
                [
                    recipe.problem(
                        "method.kind",
                        f"prefix tuning of a classifier needs a forward that takes "
                        f"past_key_values (peft looks for that name); {name} does not",
                        "use kind prompt or ptuning (they prepend to the input embeddings), or "
                        "prefix tuning with task causal_lm",
                    )
                ]
            )
        return
    # causal LMs: transformers 5 decoders name it ``cache`` and still accept past_key_values
    name, ok = forward_takes(
        model_dir, recipe.task, ("past_key_values", "cache"), recipe.model.trust_remote_code
    )
    if not ok:
        raise RecipeError(
            [
                recipe.problem(
                    "method.kind",
                    f"prefix tuning needs a model that takes past key values; {name} does not",
                    "use kind prompt or ptuning (they prepend to the input embeddings), or a "
                    "decoder model",
                )
            ]
        )


def check_layers(recipe: Recipe, model) -> None:
    """``method.layers`` must name blocks the model has (known once its config is read)."""
    layers = recipe.method.layers
    if not layers:
        return
    n = num_blocks(model.config)
    if n is None:
        raise RecipeError(
            [
                recipe.problem(
                    "method.layers", f"cannot tell how many blocks {type(model).__name__} has"
                )
            ]
        )
    bad = [i for i in layers if i >= n]
    if bad:
        raise RecipeError(
            [
                recipe.problem(
                    "method.layers",
                    f"block {bad[0]} is out of range: {type(model).__name__} has {n} blocks "
                    f"(0 to {n - 1})",
                    f"name blocks between 0 and {n - 1}",
                )
            ]
        )


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or pattern in name.split(".") or pattern in name


def freeze_for_full(recipe: Recipe, model) -> tuple[str, ...]:
    """``full``: train only ``method.layers`` (plus the task head), and never ``method.freeze``.
    Returns the lines the adapt stage prints about it."""
    m = recipe.method
    lines = []
    params = list(model.named_parameters())
    if m.layers:
        keep = set(m.layers)
        for name, p in params:
            head = any(part in HEAD_NAMES for part in name.split(".")[:-1])
            if not head and block_of(name) not in keep:
                p.requires_grad_(False)
        lines.append(f"full fine-tuning of blocks {sorted(keep)} and the task head only")
    for pattern in m.freeze or ():
        hit = [(n, p) for n, p in params if _matches(n, pattern)]
        if not hit:
            tops = sorted(
                {
                    ".".join(n.split(".")[:2]) if n.count(".") > 1 else n.split(".")[0]
                    for n, _ in params
                }
            )
            raise RecipeError(
                [
                    recipe.problem(
                        "method.freeze",
                        f"{pattern!r} matches no parameter of {type(model).__name__}",
                        f"parameter names start with: {', '.join(tops)}",
                    )
                ]
            )
        for _, p in hit:
            p.requires_grad_(False)
        lines.append(f"frozen by {pattern!r}: {sum(p.numel() for _, p in hit):,} parameters")
    return tuple(lines)


def prompt_lines(recipe: Recipe, model) -> tuple[str, ...]:
    """The virtual-token arithmetic of prefix / prompt / p-tuning."""
    m = recipe.method
    if m.kind not in PROMPT_KINDS:
        return ()
    cfg = model.peft_config["default"]
    v, d, layers = m.virtual_tokens, cfg.token_dim, cfg.num_layers
    enc = sum(p.numel() for n, p in model.named_parameters() if "prompt_encoder" in n)
    if m.kind == "prefix":
        how = (
            f"{v} virtual tokens x {layers} layers x 2 (key, value) x {d} = {v * layers * 2 * d:,}"
        )
    elif m.kind == "prompt":
        how = f"{v} virtual tokens x {d} = {v * d:,}"
    else:
        how = f"{v} virtual tokens x {d} ({v * d:,}) through an MLP encoder: {enc:,} in all"
    return (f"{m.kind} tuning: {how}; every sequence is {v} tokens longer",)


def eva_initialise(model, recipe: Recipe, features: list[dict], pad_id: int) -> None:
    """EVA: the LoRA A matrices from an SVD of the targets' inputs on training batches."""
    from peft import initialize_lora_eva_weights

    from ftcli.data.tokenize import collate

    if not features:
        raise RecipeError([recipe.problem("method.init", "eva needs training examples")])
    keep = ("input_ids", "attention_mask") + (("labels",) if recipe.task == "causal_lm" else ())
    bs = recipe.train.batch_size
    batches = []
    for i in range(0, min(len(features), 16 * bs), bs):
        b = collate(features[i : i + bs], pad_id)
        batches.append({k: v.to(model.device) for k, v in b.items() if k in keep})
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)


def save_initial_adapter(model, recipe: Recipe, run_dir: Path) -> Path | None:
    """PiSSA/OLoRA start from a rewritten base: keep the adapter as it started (run/init/adapter)
    so the saved adapter can be converted back to a plain LoRA delta on the original base."""
    if recipe.method.kind not in LORA_KINDS or recipe.method.init not in CONVERTED_INITS:
        return None
    from ftcli.util import atomic_dir

    cfg = model.peft_config["default"]
    target = run_dir / INIT_ADAPTER
    before = cfg.init_lora_weights
    cfg.init_lora_weights = True  # peft's documented way: the initial adapter loads as plain LoRA
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    finally:
        cfg.init_lora_weights = before
    return target


def adapt(
    recipe: Recipe,
    tokenizer,
    model_dir: str,
    labels: list[str] | None,
    device: str,
    device_index: int = 0,
    train_features: list[dict] | None = None,
) -> Adapted:
    """Load the base model and make it trainable by the recipe's method. ``train_features``: the
    batches EVA initialises from (only ``init: eva`` reads them)."""
    check_supported(recipe, model_dir)
    model = load_recipe_base(recipe, model_dir, labels, tokenizer, device, device_index)
    gc = recipe.train.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    kind = recipe.method.kind
    check_layers(recipe, model)
    extra: tuple = ()
    if kind == "full":
        extra = freeze_for_full(recipe, model)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    else:
        if kind not in PROMPT_KINDS:
            check_targets(recipe, model)
        if kind == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
            )
        elif gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        try:
            model = get_peft_model(model, peft_config(recipe, model))
        except (ValueError, TypeError) as exc:
            key = "method.layers" if "layer" in str(exc) else "method.target_modules"
            if kind in PROMPT_KINDS:
                key = "method.kind"
            raise RecipeError(
                [recipe.problem(key, f"peft cannot build {kind} here: {str(exc).splitlines()[0]}")]
            ) from None
        if kind == "qlora":
            keep_4bit_trainable_on_cpu(model)
            if recipe.method.init == "loftq":
                if device != "cuda":
                    raise RecipeError(
                        [
                            recipe.problem(
                                "method.init",
                                "peft's LoftQ for a 4-bit base runs on CUDA only; this run is on "
                                "the CPU",
                                "use init gaussian here, or train on a GPU",
                            )
                        ]
                    )
                from peft import replace_lora_weights_loftq

                replace_lora_weights_loftq(model, model_path=_safetensors_file(model_dir))
        if recipe.method.init == "eva" and kind in LORA_KINDS:
            eva_initialise(model, recipe, train_features or [], tokenizer.pad_token_id)
        extra = prompt_lines(recipe, model)
    if recipe.model.dtype == "auto":
        # auto loaded a CUDA base in bf16 (it computes under bf16 autocast): what trains stays fp32
        upcast_trainable(model)
    if gc:
        model.config.use_cache = False
    return Adapted(model, tokenizer, model_dir, count_params(model, extra))


def _safetensors_file(model_dir: str) -> str:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise FtcliError(
            f"loftq reads the base's weights from one safetensors file; {model_dir} has {len(files)}",
            hint="use init gaussian, or a base saved as a single model.safetensors",
        )
    return str(files[0])
