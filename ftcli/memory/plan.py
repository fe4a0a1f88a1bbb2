"""The plan of ``ftcli estimate-memory``: a model's parameter inventory and a run's setup.

``plan_recipe(recipe)`` / ``plan_model(name, ...)`` read the model's config (folder, GGUF metadata,
bundled card or hub), build it on the meta device, attach LoRA there with peft, and hand the exact
parameter inventory to ``estimate.estimate``. ``measure`` runs real steps to check the figure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ftcli.data.tokenize import padded_width
from ftcli.errors import FtcliError
from ftcli.memory.arch import (
    Inventory,
    LoadedConfig,
    attach_lora_meta,
    build_meta,
    infer_task,
    inventory,
    layer_dims,
    load_config,
)
from ftcli.memory.estimate import Estimate, estimate
from ftcli.memory.setup import DTYPE_BYTES, Setup


@dataclass
class Plan:
    """A model's inventory and a run's setup: everything ``estimate`` needs."""

    name: str
    loaded: LoadedConfig
    inv: Inventory
    setup: Setup

    def estimate(self, **changes) -> Estimate:
        return estimate(self.inv, replace(self.setup, **changes) if changes else self.setup)


def default_device(choice: str = "auto") -> str:
    """The device ``ftcli train`` would use: a CUDA GPU when one is visible, else the CPU."""
    if choice in ("cpu", "cuda"):
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_from_recipe(recipe, device: str | None = None) -> Setup:
    """The Setup a recipe trains with, its ``auto`` values resolved as train resolves them:
    mixed precision measured on this machine (cached; bf16 assumed when planning for a CUDA GPU
    that is not here), dtype bf16 on a CUDA GPU computing in bf16, else float32."""
    import torch

    from ftcli.precision import auto_weight_dtype, resolve_mixed_precision

    dev = default_device(device or recipe.train.device)
    m, t = recipe.method, recipe.train
    mp, bf16_gpu = t.mixed_precision, True
    here = dev == "cpu" or torch.cuda.is_available()
    if here and dev == "cuda":
        bf16_gpu = torch.cuda.is_bf16_supported()
    dtype = recipe.model.dtype
    if dtype == "auto":  # as models.weight_dtype_of: an auto precision trains bf16 weights in bf16
        dtype = auto_weight_dtype(dev, "bf16" if mp == "auto" else mp, m.kind, bf16_gpu)
    if mp == "auto":
        mp = resolve_mixed_precision(mp, dev, recipe, layer_dims(recipe), dtype) if here else "bf16"
    q = m.quant
    targets = m.target_modules
    # pair tasks: a micro-batch of B pairs runs 2B sequences (chosen and rejected stacked); KTO's
    # B rows run with gradients, its mismatched KL rows without (one block's activations)
    pairs = recipe.task == "reward" or (
        recipe.task == "preference" and recipe.preference.loss != "kto"
    )
    return Setup(
        task=MEMORY_TASK.get(recipe.task, recipe.task),
        method=m.kind,
        batch_size=t.batch_size * (2 if pairs else 1),
        seq_len=padded_width(recipe.data.max_length),  # the loop pads to PAD_MULTIPLE
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_accumulation=t.gradient_accumulation,
        optimizer=t.optimizer.name,
        momentum=t.optimizer.momentum,
        weight_decay=t.optimizer.weight_decay,
        dtype=dtype,
        mixed_precision=mp,
        attn_implementation=recipe.model.attn_implementation or "sdpa",
        quant_bits=q.bits,
        quant_type=q.quant_type,
        double_quant=q.double_quant,
        compute_dtype=q.compute_dtype,
        r=m.r,
        alpha=m.alpha,
        dropout=m.dropout,
        target_modules=tuple(targets) if isinstance(targets, list) else targets,
        modules_to_save=tuple(m.modules_to_save) if m.modules_to_save else None,
        num_labels=1
        if recipe.task == "reward"
        else len(recipe.data.labels)
        if recipe.data.labels
        else 2,
        device=dev,
        loss_path=loop_loss_path(MEMORY_TASK.get(recipe.task, recipe.task), m.kind),
        reference_copy=reference_copy(recipe),
    )


# the model each task trains, as the estimate builds it: a preference policy is a causal LM, a
# reward model a classifier with one logit
MEMORY_TASK = {"preference": "causal_lm", "reward": "classification"}


def reference_copy(recipe) -> bool:
    """Whether training holds a second, frozen model as the reference: a loss that has one, not
    scored before training, and not the policy's own weights with its adapter disabled."""
    p = recipe.preference
    if recipe.task != "preference" or not p.uses_reference or p.precompute_reference:
        return False
    return recipe.method.kind == "full" or p.reference != "start"


def loop_loss_path(task: str, kind: str, config=None) -> str:
    """The loss path ftcli's loop takes (ftcli.forward.supervised_cross_entropy): its own
    for causal LMs, the model's for prompt-style methods and heads that scale their logits."""
    from ftcli.recipe import PROMPT_KINDS

    if task != "causal_lm" or kind in PROMPT_KINDS:
        return "transformers"
    if config is not None:
        from ftcli.forward import SCALED_LOGITS

        if any(getattr(config, a, None) not in (None, 1, 1.0) for a in SCALED_LOGITS):
            return "transformers"
    return "ftcli"


def checkpoint_bytes(loaded: LoadedConfig, params: int) -> int:
    """Size of the weights file a CPU load maps: the folder's safetensors, ftcli's fp32 conversion of
    a GGUF, else the parameters in the config's dtype."""
    if loaded.source == "folder":
        files = list(Path(loaded.where).glob("*.safetensors")) or list(
            Path(loaded.where).glob("*.bin")
        )
        if files:
            return sum(f.stat().st_size for f in files)
    if loaded.source == "gguf":
        return 4 * params  # ftcli converts a GGUF once into fp32 safetensors and loads those
    dt = str(
        getattr(loaded.config, "torch_dtype", None)
        or getattr(loaded.config, "dtype", None)
        or "float32"
    )
    return DTYPE_BYTES.get(dt.replace("torch.", ""), 4) * params


def build_plan(
    name: str,
    setup: Setup,
    revision: str | None = None,
    trust_remote_code: bool = False,
    make_trainable=None,
) -> Plan:
    """Config -> meta model (+ peft LoRA) -> inventory, for ``setup``. ``make_trainable`` (meta
    model -> model): a recipe's own strategy (peft method, layers, freezing) instead of plain LoRA."""
    setup.check()
    loaded = load_config(name, revision, trust_remote_code)
    model = build_meta(
        loaded.config,
        setup.task,
        setup.num_labels,
        setup.attn_implementation if setup.attn_implementation != "flash_attention_2" else None,
    )
    if make_trainable is None and setup.method not in ("full", "lora", "qlora"):
        raise FtcliError(
            f"the estimate of method {setup.method!r} is planned from a recipe",
            hint="run estimate-memory on a recipe file with that method.kind",
        )
    if make_trainable is not None:
        model = make_trainable(model)
    elif setup.method in ("lora", "qlora"):
        targets = (
            list(setup.target_modules)
            if isinstance(setup.target_modules, tuple)
            else setup.target_modules
        )
        model = attach_lora_meta(
            model, setup.task, setup.r, setup.alpha, setup.dropout, targets, setup.modules_to_save
        )
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    inv = inventory(model, loaded.config)
    if setup.device == "cpu" and setup.checkpoint_bytes is None:
        setup = replace(setup, checkpoint_bytes=checkpoint_bytes(loaded, inv.base_total))
    return Plan(name=name, loaded=loaded, inv=inv, setup=setup)


def strategy_on_meta(recipe):
    """What ``adapt`` does to the model, on the meta model: the recipe's peft config (initialised
    plainly: pissa/eva change values, not shapes), ``method.layers`` and ``method.freeze``. None
    for plain LoRA/QLoRA and full fine-tuning, which the estimate builds itself."""
    m = recipe.method
    plain = m.kind in ("lora", "qlora") and not (m.dora or m.layers)
    if plain or (m.kind == "full" and not (m.layers or m.freeze)):
        return None

    def apply(model):
        import torch
        from peft import get_peft_model

        from ftcli.adapt import freeze_for_full, peft_config

        if m.kind == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            freeze_for_full(recipe, model)
            return model
        method = m.model_copy(update={"init": "gaussian"})
        cfg = peft_config(recipe.model_copy(update={"method": method}), model)
        try:
            with torch.device("meta"):
                return get_peft_model(model, cfg)
        except (ValueError, TypeError) as exc:
            raise FtcliError(f"{m.kind} cannot be attached: {exc}") from None

    return apply


def plan_recipe(recipe, device: str | None = None, **changes) -> Plan:
    """The plan of ``recipe``. ``max_length: auto`` should be resolved first (``ftcli train`` and
    ``estimate-memory`` do, from the data); left auto, the model's position limit stands in: the
    most auto can choose, an upper bound."""
    if recipe.data.max_length == "auto":
        from ftcli.data.lengths import position_limit, with_max_length

        cfg = load_config(
            recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code
        ).config
        recipe = with_max_length(recipe, position_limit(cfg) or 512)
    setup = setup_from_recipe(recipe, device)
    # virtual tokens lengthen every sequence the model sees
    setup = replace(setup, seq_len=setup.seq_len + recipe.method.virtual_tokens, **changes)
    if recipe.train.batch_tokens:  # a token budget: as many full-length rows as it holds
        setup = replace(setup, batch_size=max(1, -(-recipe.train.batch_tokens // setup.seq_len)))
    plan = build_plan(
        recipe.model.name,
        setup,
        recipe.model.revision,
        recipe.model.trust_remote_code,
        strategy_on_meta(recipe),
    )
    if "loss_path" not in changes and setup.loss_path == "ftcli":
        path = loop_loss_path(setup.task, recipe.method.kind, plan.loaded.config)
        if path != setup.loss_path:
            plan = replace(plan, setup=replace(setup, loss_path=path))
    return plan


def plan_model(name: str, task: str | None = None, **fields) -> Plan:
    """A plan from flags alone: ``--model NAME --method qlora --batch-size 4 ...``."""
    if task is None:
        task = infer_task(load_config(name).config)
    return build_plan(name, Setup(task=task, **fields))
