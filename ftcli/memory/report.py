"""What ``ftcli estimate-memory`` prints: the breakdown, the verdict, and the JSON record."""

from __future__ import annotations

from dataclasses import replace

from ftcli.errors import FtcliError
from ftcli.memory.arch import infer_task, load_config
from ftcli.memory.estimate import (
    CARDS_GB,
    card_capacity,
    fits_cards,
    max_micro_batch,
    per_device_table,
    precision_table,
)
from ftcli.memory.gpus import GPUS, Gpu
from ftcli.memory.plan import Plan, build_plan, default_device, loop_loss_path, plan_recipe
from ftcli.memory.preflight import free_device_memory
from ftcli.memory.setup import GiB, Setup, human, parse_budget
from ftcli.precision import auto_weight_dtype, measure_choice
from ftcli.ui import UI

SCHEMA_VERSION = 1


def _plan(
    recipe,
    model: str | None,
    flags: dict,
    dev: str,
    gpu: Gpu | None,
    num_devices: int,
    strategy: str,
) -> Plan:
    path = flags.get("loss_path") or "auto"
    if recipe is not None:
        _check_loss_path(path, recipe.task)
        changes = {"num_devices": num_devices, "strategy": strategy}
        if gpu is not None and recipe.train.mixed_precision == "auto":
            changes["mixed_precision"] = gpu.mixed_precision
        if gpu is not None and recipe.model.dtype == "auto":  # as train resolves it on that card
            mp = changes.get("mixed_precision", recipe.train.mixed_precision)
            changes["dtype"] = auto_weight_dtype("cuda", mp, recipe.method.kind, gpu.bf16)
        if path != "auto":
            changes["loss_path"] = path
        return plan_recipe(recipe, dev, **changes)
    task = flags["task"] or infer_task(load_config(model).config)
    if task not in ("causal_lm", "classification"):
        raise FtcliError(f"--task {task!r} is not one of causal_lm, classification")
    _check_loss_path(path, task)
    targets = flags["target_modules"]
    if targets and targets != "all-linear":
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    mp = flags["mixed_precision"] or (
        (gpu.mixed_precision if gpu else "bf16") if dev == "cuda" else _cpu_auto(model)
    )
    fields = {
        "method": flags["method"],
        "batch_size": flags["batch_size"] or 8,
        "seq_len": flags["seq_len"] or 128,
        "gradient_checkpointing": bool(flags["gradient_checkpointing"]),
        "optimizer": flags["optimizer"] or "adamw",
        "dtype": flags["dtype"] or "float32",
        "mixed_precision": mp,
        "attn_implementation": flags["attn_implementation"] or "sdpa",
        "r": flags["r"] or 8,
        "target_modules": targets or None,
        "device": dev,
        "num_devices": num_devices,
        "strategy": strategy,
        "loss_path": loop_loss_path(task, flags["method"]) if path == "auto" else path,
    }
    plan = build_plan(model, Setup(task=task, **fields))
    if path == "auto" and plan.setup.loss_path == "ftcli":
        found = loop_loss_path(task, flags["method"], plan.loaded.config)
        plan = replace(plan, setup=replace(plan.setup, loss_path=found))
    return plan


def _cpu_auto(model: str) -> str:
    """``mixed_precision: auto`` on this CPU for ``model``'s layer shapes (measured once, cached),
    as train resolves it."""
    from ftcli.memory.arch import dims_of

    d = dims_of(load_config(model).config)
    return measure_choice("cpu", None, (int(d.hidden), int(d.intermediate))).mixed_precision


def _check_loss_path(path: str, task: str) -> None:
    if path != "auto" and task != "causal_lm":
        raise FtcliError(
            f"--loss-path {path} only applies to task causal_lm (a {task} head has no "
            "vocabulary-sized logits)",
            hint="drop --loss-path",
        )


def _check_flags(flags: dict, device: str | None, gpu: Gpu | None) -> None:
    """Flags that would change nothing for this method or device are errors, not silent no-ops."""
    method = flags.get("method")
    if flags.get("dtype") and method == "qlora":
        raise FtcliError(
            f"--dtype {flags['dtype']} does not apply to --method qlora: its base weights are "
            "4-bit (NF4) and the rest stay float32",
            hint="drop --dtype, or plan --method lora or full",
        )
    if method == "full":
        for key in ("r", "target_modules"):
            if flags.get(key):
                raise FtcliError(
                    f"--{key.replace('_', '-')} does not apply to --method full (it is a LoRA setting)",
                    hint="drop it, or plan --method lora",
                )
    if gpu is not None and device not in (None, "auto", "cuda"):
        raise FtcliError(
            f"--gpu {gpu.name} plans for a CUDA GPU, not --device {device}", hint="drop --device"
        )
    cpu = device == "cpu" or (gpu is None and device in (None, "auto") and not _cuda_ok())
    mp = flags.get("mixed_precision")
    if mp == "fp16" and cpu:
        raise FtcliError(
            "--mixed-precision fp16 needs a CUDA GPU", hint="plan for one with --gpu CARD"
        )
    if mp == "bf16" and gpu is not None and not gpu.bf16:
        raise FtcliError(
            f"the {gpu.label} has no bf16", hint="use --mixed-precision fp16 (the default there)"
        )


def check_recipe_or_model(recipe: str | None, model: str | None) -> None:
    """The estimate plans either a recipe or a --model, exactly one of them."""
    if recipe is None and model is None:
        raise FtcliError(
            "give a recipe, or --model NAME",
            hint="ftcli estimate-memory --model mistral-7b --method qlora",
        )
    if recipe is not None and model is not None:
        raise FtcliError(
            "give a recipe or --model, not both",
            hint="change a recipe's model with --set model.name=...",
        )


def _resolve_length(recipe, ui):
    """``max_length: auto`` estimated as training will run it: chosen from the recipe's data and
    tokenizer the same way (ftcli/data/lengths.py). Where those cannot be read, the model's
    position limit, the most auto can choose: an upper bound, and said so."""
    from ftcli.data.lengths import model_position_limit, resolve_from_data, with_max_length

    if recipe.data.streaming:  # the stream's first training examples, never the whole corpus
        from ftcli.data.stream import resolve_from_stream as resolve_from_data
    try:
        recipe, choice = resolve_from_data(recipe)
        ui.info(f"  {choice.line()}")
        return recipe
    except FtcliError as exc:
        limit = model_position_limit(recipe)
        if limit is None:
            raise FtcliError(
                f"data.max_length is auto, and neither the data ({exc.message}) nor the model's "
                "position limit could be read to choose it",
                hint="set data.max_length, e.g. --set data.max_length=512",
            ) from None
        ui.info(
            f"  max_length auto: the data could not be read ({exc.message}); estimated at the "
            f"model's position limit, {limit} tokens, the most auto can choose (an upper bound)"
        )
        return with_max_length(recipe, limit)


def run_estimate(
    recipe=None,
    model: str | None = None,
    flags: dict | None = None,
    device: str | None = None,
    num_devices: int = 1,
    strategy: str = "ddp",
    budget: str | None = None,
    weights_only: bool = False,
    measure: bool = False,
    steps: int = 3,
    json_mode: bool = False,
    gpu: str | None = None,
) -> dict:
    """Plan, estimate, print; optionally measure. Returns the --json record."""
    flags = flags or {}
    card = GPUS[gpu] if gpu else None
    if recipe is not None:
        # the loss path is not a recipe setting: it says which loss the estimate describes
        ignored = [
            k for k, v in flags.items() if v is not None and k not in ("method", "loss_path")
        ]
        if ignored or flags.get("method") not in (None, "lora"):
            raise FtcliError(
                f"with a recipe, change settings with --set, not --{(ignored or ['method'])[0].replace('_', '-')}",
                hint="e.g. --set train.batch_size=4 --set data.max_length=512",
            )
    if strategy not in ("ddp", "fsdp"):
        raise FtcliError(f"--strategy {strategy!r} is not one of ddp, fsdp")
    if num_devices < 1:
        raise FtcliError("--num-devices must be at least 1")
    _check_flags(flags, device, card)
    budget_bytes = parse_budget(budget) if budget else None
    ui = UI(json_mode)
    asked = "cuda" if card else (device or "auto")
    dev = default_device(asked if asked != "auto" else (recipe.train.device if recipe else "auto"))
    if recipe is not None and recipe.data.max_length == "auto":
        recipe = _resolve_length(recipe, ui)
    plan = _plan(recipe, model, flags, dev, card, num_devices, strategy)
    s = plan.setup
    if card is None and dev == "cpu" and asked == "auto":
        planned = "this machine's CPU (no GPU here)"
    elif card is not None:
        planned = f"the {card.label}"
    else:
        planned = f"this machine's {dev}" if asked == "auto" else dev
    model_info = {
        "name": plan.name,
        "source": plan.loaded.source,
        "where": plan.loaded.where,
        "architecture": plan.inv.architecture,
        "params": plan.inv.base_total,
        "layers": plan.inv.dims.layers,
        "hidden": plan.inv.dims.hidden,
        "heads": plan.inv.dims.heads,
        "kv_heads": plan.inv.dims.kv_heads,
        "intermediate": plan.inv.dims.intermediate,
        "vocab": plan.inv.dims.vocab,
        "tied": plan.inv.dims.tied,
    }
    ui.info(
        f"[bold]{plan.name}[/] ({plan.inv.architecture}, {plan.inv.base_total / 1e9:.3g} B parameters, "
        f"config from {plan.loaded.source}: {plan.loaded.where})"
    )
    table = precision_table(plan.inv)
    if weights_only:
        ui.table(
            "weights alone",
            [
                (
                    r["precision"],
                    human(r["bytes"]),
                    f"{r['bytes'] / 1e9:.2f} GB",
                    f"{r['bytes_per_param']:.3f} B/param",
                )
                for r in table
            ],
            headers=("precision", "size", "size (10^9)", "per parameter"),
        )
        return {"schema": SCHEMA_VERSION, "model": model_info, "precision_table": table}

    est = plan.estimate()
    ui.info(f"[bold]planned for {planned}[/]")
    if card is None and dev == "cpu" and asked == "auto":
        ui.info(
            "  to plan for a GPU, name it: --gpu a100-80gb (or h100, l4, rtx4090, t4, ...; "
            "--help lists them)"
        )
    ui.info(
        f"{s.method} on {s.device}, micro-batch {s.batch_size} x {s.seq_len} tokens, "
        f"{'gradient checkpointing, ' if s.gradient_checkpointing else ''}{s.optimizer}, "
        f"weights {s.unquantized_dtype if s.method == 'qlora' else s.dtype}"
        f"{', ' + s.quant_type + (' + double quant' if s.double_quant else '') if s.method == 'qlora' else ''}, "
        f"mixed precision {s.mixed_precision}, attention {s.attn_implementation}"
    )
    rows = [(name, human(b), how) for name, b, how in est.components()]
    ui.table("memory at the peak, per device", rows, headers=("component", "bytes", "how"))
    if est.acts.detail.get("parts_per_token_per_layer"):
        parts = ", ".join(
            f"{k} {v:,}" for k, v in est.acts.detail["parts_per_token_per_layer"].items() if v
        )
        ui.info(
            f"  activations per token per block: {est.acts.detail['per_token_per_layer']:,} bytes ({parts})"
        )
    ui.info(
        f"[bold]peak {human(est.total)}[/] at the {est.peak_phase} "
        f"(tensors {human(est.peak_allocated)} + overhead {human(est.overhead)}); "
        + ", ".join(f"{k} {human(v)}" for k, v in est.phases.items())
    )
    for note in est.notes:
        ui.info(f"  note: {note}")
    result: dict = {
        "schema": SCHEMA_VERSION,
        "model": model_info,
        "estimate": est.as_dict(),
        "precision_table": table,
        "planned_for": {
            "device": dev,
            "what": planned,
            "gpu": (
                {"name": card.name, "memory_gb": card.memory_gb, "bf16": card.bf16}
                if card
                else None
            ),
        },
    }
    if s.device == "cuda":
        cards = fits_cards(est.total)
        ui.info(
            "fits: "
            + "  ".join(
                f"{c['card_gb']} GB {'[green]yes[/]' if c['fits'] else '[red]no[/]'}" for c in cards
            )
        )
        result["cards"] = cards
    if card is not None:
        cap = card_capacity(card.memory_gb)
        ui.info(
            f"on the {card.label}: {human(est.total)} of {human(cap)} -> "
            + ("[green]fits[/]" if est.total <= cap else "[red]does NOT fit[/]")
        )
        result["fits_gpu"] = est.total <= cap
        if budget_bytes is None:
            best = max_micro_batch(plan.inv, s, cap)
            ui.info(f"  largest micro-batch on it: {best} x {s.seq_len} tokens")
            result["max_micro_batch_on_gpu"] = best
    free = (
        free_device_memory(s.device) if card is None and (s.device == "cpu" or _cuda_ok()) else None
    )
    if free is not None:
        ui.info(
            f"free on this {s.device}: {human(free)} -> {'fits' if est.total <= free else 'does NOT fit'}"
        )
        result["free_here"] = free
    devices = per_device_table(plan.inv, replace(s, num_devices=1), max(1, num_devices))
    if num_devices > 1:
        ui.table(
            "per device",
            [(d["devices"], human(d["ddp"]), human(d["fsdp"])) for d in devices],
            headers=("devices", "DDP", "FSDP"),
        )
    result["per_device"] = devices
    if budget_bytes is not None:
        best = max_micro_batch(plan.inv, s, budget_bytes)
        ui.info(
            f"largest micro-batch within {budget} ({human(budget_bytes)}): "
            + (
                f"[bold]{best}[/] x {s.seq_len} tokens"
                if best
                else "[red]none[/]: even one example does not fit"
            )
        )
        result["budget"] = {"bytes": budget_bytes, "max_micro_batch": best}
    else:
        result["max_micro_batch_by_card"] = (
            {g: max_micro_batch(plan.inv, s, int(g * GiB * 0.99)) for g in CARDS_GB}
            if s.device == "cuda"
            else None
        )
    if measure:
        if recipe is None:
            raise FtcliError(
                "--measure needs a recipe (it trains a few steps on the recipe's model)"
            )
        if card is not None and not _cuda_ok():
            raise FtcliError(
                f"--measure trains here, and this machine has no {card.label}",
                hint="drop --measure to plan for the card, or run it on a machine that has one",
            )
        from ftcli.memory.measure import measure as run_measure

        ui.info(
            f"measuring: {steps} training steps of {s.batch_size} x {s.seq_len} tokens in a fresh process ..."
        )
        got = run_measure(recipe, s.device, steps, loss_path=s.loss_path)
        predicted = est.peak_allocated if s.device == "cuda" else est.total
        ratio = predicted / got["peak"] if got["peak"] else float("nan")
        ui.table(
            "predicted vs measured",
            [
                (
                    "predicted",
                    human(predicted),
                    "tensors only (max_memory_allocated excludes the CUDA context)"
                    if s.device == "cuda"
                    else "tensors + CPU runtime",
                ),
                ("measured", human(got["peak"]), got["quantity"]),
                (
                    "ratio",
                    f"{ratio:.3f}",
                    "within 15%" if abs(ratio - 1) <= 0.15 else "OFF by more than 15%",
                ),
            ],
            headers=("", "bytes", ""),
        )
        result["measured"] = {**got, "predicted": predicted, "ratio": ratio}
    return result


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()
