"""``ftcli estimate-memory``: a training run's peak memory, planned from the model's config."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import typer

from ftcli.cli.app import JsonOpt, SetOpt, app, command, load_recipe_arg
from ftcli.recipe import OptimizerName

OPTIMIZER_NAMES = get_args(OptimizerName)  # the recipe's: train.optimizer.name
GPU_NAMES = (
    "h200", "h100", "a100-80gb", "a100-40gb", "l40s", "a6000", "l4", "a10g",
    "rtx4090", "rtx3090", "rtx4080", "t4", "v100", "v100-32gb",
)  # fmt: skip  # ftcli/memory/gpus.py's table (kept here: --help must not import torch)


@app.command("estimate-memory")
@command
def estimate_memory(
    recipe: Annotated[
        str | None,
        typer.Argument(help="Recipe file (or bundled recipe name). Omit it and give --model."),
    ] = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model without a recipe: hub id, folder, .gguf, pkg:..., or a bundled card (llama-2-7b, mistral-7b, ...).",
        ),
    ] = None,
    task: Annotated[
        Literal["causal_lm", "classification"] | None,
        typer.Option(
            case_sensitive=False,
            help="Default: from the model's config.",
        ),
    ] = None,
    method: Annotated[
        Literal["full", "lora", "qlora"],
        typer.Option(case_sensitive=False, help="Without a recipe."),
    ] = "lora",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Micro-batch per device.")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Tokens per example (padded length).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in backward.",
        ),
    ] = None,
    optimizer: Annotated[
        Literal[OPTIMIZER_NAMES] | None,
        typer.Option(case_sensitive=False, help="The optimizer."),
    ] = None,
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"] | None,
        typer.Option(
            case_sensitive=False,
            help="Weights of full/LoRA runs (ftcli's default float32; QLoRA's base is 4-bit).",
        ),
    ] = None,
    mixed_precision: Annotated[
        Literal["no", "bf16", "fp16"] | None,
        typer.Option(
            "--mixed-precision",
            case_sensitive=False,
            help="Default: bf16 on CUDA (fp16 on a --gpu without bf16); on the CPU what "
            "train's auto measures here (cached).",
        ),
    ] = None,
    attn: Annotated[
        Literal["eager", "sdpa", "flash_attention_2"] | None,
        typer.Option("--attn", case_sensitive=False),
    ] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank (without a recipe).")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option("--target-modules", help="Comma-separated LoRA targets, or all-linear."),
    ] = None,
    device: Annotated[
        Literal["auto", "cuda", "cpu"] | None,
        typer.Option(
            case_sensitive=False,
            help="Which device to plan for (auto: the one train would use; for a GPU that is not "
            "here, name it with --gpu).",
        ),
    ] = None,
    gpu: Annotated[
        Literal[GPU_NAMES] | None,
        typer.Option(
            "--gpu",
            metavar="CARD",
            case_sensitive=False,
            help="Plan for this GPU (CUDA, bf16 where it has it): " + ", ".join(GPU_NAMES) + ".",
        ),
    ] = None,
    num_devices: Annotated[
        int, typer.Option("--num-devices", help="Devices for the per-device table (1..N).")
    ] = 1,
    strategy: Annotated[
        Literal["ddp", "fsdp"], typer.Option(case_sensitive=False, help="For --num-devices > 1.")
    ] = "ddp",
    budget: Annotated[
        str | None,
        typer.Option(
            help="Memory budget per device (24GB, 24GiB, 16000MB): the largest micro-batch that fits."
        ),
    ] = None,
    weights_only: Annotated[
        bool, typer.Option("--weights-only", help="Only the table of weights at each precision.")
    ] = False,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure", help="Run a few real training steps and compare the measured peak."
        ),
    ] = False,
    steps: Annotated[int, typer.Option(help="Steps for --measure.")] = 3,
    loss_path: Annotated[
        Literal["auto", "ftcli", "transformers"],
        typer.Option(
            "--loss-path",
            case_sensitive=False,
            help="Causal LM: ftcli's loss (LM head on supervised positions, 1,024 at a time; what "
            "ftcli train runs) or transformers' (full logits; plain Trainer). auto: what ftcli "
            "would run.",
        ),
    ] = "auto",
    json_: JsonOpt = False,
):
    """Estimate a training run's peak memory before any weights are downloaded.

    [bold]Examples[/]

      ftcli estimate-memory recipes/quickstart.yaml

      ftcli estimate-memory --model llama-3-8b --method qlora --batch-size 4 --seq-len 2048 --gradient-checkpointing --gpu a100-80gb

      ftcli estimate-memory --model meta-llama/Llama-2-7b-hf --weights-only

      ftcli estimate-memory --model llama-3-8b --method full --optimizer adamw8bit --num-devices 8 --strategy fsdp

      ftcli estimate-memory recipes/quickstart.yaml --budget 24GB

      ftcli estimate-memory recipes/quickstart.yaml --measure   [dim]# predicted vs measured peak[/]
    """
    from ftcli.memory.report import check_recipe_or_model, run_estimate

    check_recipe_or_model(recipe, model)
    return run_estimate(
        recipe=load_recipe_arg(recipe, set_) if recipe else None,
        model=model,
        flags={
            "task": task,
            "method": method,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing,
            "optimizer": optimizer,
            "dtype": dtype,
            "mixed_precision": mixed_precision,
            "attn_implementation": attn,
            "r": r,
            "target_modules": target_modules,
            "loss_path": loss_path,
        },
        device=device,
        gpu=gpu,
        num_devices=num_devices,
        strategy=strategy,
        budget=budget,
        weights_only=weights_only,
        measure=measure,
        steps=steps,
        json_mode=json_,
    )
