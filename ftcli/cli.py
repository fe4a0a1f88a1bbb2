"""The command line. Thin: parse, load the recipe, call a stage, print the record.

This is the only place exceptions become exit codes: 0 success, 1 a user error (one clear
message, no traceback), 2 a usage error (typer/click), 130 interrupted. Heavy libraries (torch,
transformers) are imported inside the commands, so ``--help`` and ``validate`` start fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ftcli.errors import FtcliError

app = typer.Typer(
    name="ftcli",
    help="Fine-tune pre-trained models from a YAML recipe: full, LoRA or QLoRA; evaluated against the "
    "base model, merged and verified.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (human output goes to stderr).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key before validation, e.g. --set train.optimizer.lr=1.0e-4 (repeatable)."),
]


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def command(fn):
    """Turn FtcliError into one message + exit 1, Ctrl-C into exit 130; print --json results."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ftcli.ui import quiet_libraries

        quiet_libraries()
        as_json = kwargs.get("json_", False)
        try:
            result = fn(*args, **kwargs)
        except FtcliError as exc:
            if as_json:
                _emit_json({"ok": False, "error": exc.render()})
            from ftcli.ui import is_main_process

            if is_main_process() or not as_json:
                sys.stderr.write(f"error: {exc.render()}\n")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None
        except _interrupted_type() as exc:
            where = f"; checkpoint saved at {exc.checkpoint}" if exc.checkpoint else ""
            sys.stderr.write(f"interrupted at step {exc.step}{where}\n  resume with: ftcli train <recipe> --resume\n")
            raise typer.Exit(130) from None
        if as_json and result is not None:
            from ftcli.ui import is_main_process

            if is_main_process():
                _emit_json({"ok": True, **result} if isinstance(result, dict) else result)

    return wrapper


def _interrupted_type():
    from ftcli.train import Interrupted

    return Interrupted


def _load(recipe: str, overrides: list[str] | None):
    from ftcli.recipe import load_recipe, resolve_recipe_path

    return load_recipe(resolve_recipe_path(recipe), overrides or [])


@app.command()
@command
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over, replacing an existing run folder.")] = False,
    no_memory_check: Annotated[bool, typer.Option("--no-memory-check", help="Train even when the memory estimate exceeds the free memory.")] = False,
    json_: JsonOpt = False,
):
    """Run prepare -> adapt -> train -> evaluate -> merge into runs/<name>/.

    [bold]Examples[/]

      ftcli train recipes/quickstart.yaml

      ftcli train quickstart --set train.epochs=1 --set method.r=16

      ftcli train recipes/smollm2-chat-lora.yaml --resume

      torchrun --nproc_per_node 2 -m ftcli train recipes/quickstart.yaml   [dim]# 2 processes[/]
    """
    from ftcli.run import train_run
    from ftcli.ui import UI

    r = _load(recipe, set_)
    return train_run(r, UI(json_), resume=resume, force=force, memory_check=not no_memory_check)


@app.command()
@command
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")],
    set_: SetOpt = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="Check only the recipe, not the data's columns.")] = False,
    json_: JsonOpt = False,
):
    """Check a recipe (and that its data has the named columns) without loading any model.

    [bold]Examples[/]

      ftcli validate recipes/quickstart.yaml

      ftcli validate my.yaml --set method.kind=qlora --json
    """
    from ftcli.ui import UI

    ui = UI(json_)
    r = _load(recipe, set_)
    checked = ["schema"]
    if not no_data:
        from ftcli.data import check_columns, read_source
        from ftcli.sources import resolve_data

        source = resolve_data(r.data.path)
        if source.kind != "hub":
            check_columns(r, read_source(source, r.data), r.data.path)
            checked.append("data columns")
    ui.info(f"[green]ok[/] {recipe}: {r.task}, {r.method.kind} on {r.model.name} ({', '.join(checked)} checked)")
    return {"recipe": recipe, "name": r.name, "task": r.task, "method": r.method.kind, "checked": checked,
            "resolved": r.model_dump(mode="json")}


@app.command("recipes")
@command
def list_recipes(json_: JsonOpt = False):
    """List the bundled recipes, one line each.

    [bold]Example[/]

      ftcli recipes
    """
    import yaml

    from ftcli.recipe import bundled_recipes_dir
    from ftcli.ui import UI

    rows = []
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        rows.append({"file": str(path.relative_to(bundled_recipes_dir().parent)), "name": doc.get("name"),
                     "task": doc.get("task"), "method": (doc.get("method") or {}).get("kind"),
                     "model": (doc.get("model") or {}).get("name"), "description": doc.get("description", "")})
    UI(json_).table("bundled recipes", [(r["file"], r["task"], r["method"], r["description"]) for r in rows],
                    headers=("recipe", "task", "method", "what"))
    return {"recipes": rows}


@app.command("eval")
@command
def eval_(
    run_dir: Annotated[Path | None, typer.Argument(help="Run folder (default: the latest under runs/).")] = None,
    split: Annotated[str, typer.Option(help="Which prepared split to score.")] = "test",
    json_: JsonOpt = False,
):
    """Score a finished run on its sealed test split.

    [bold]Examples[/]

      ftcli eval runs/quickstart

      ftcli eval --json
    """
    from ftcli.run import evaluate_run, latest_run
    from ftcli.ui import UI

    return evaluate_run(run_dir or latest_run(), UI(json_), split)


@app.command()
@command
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder, or a run folder holding adapter/.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged model (a new folder).")],
    base: Annotated[str | None, typer.Option(help="Base model to merge into (default: the one the adapter records).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 for the saved weights.")] = "float32",
    into: Annotated[str, typer.Option(help="QLoRA: dequantized (the weights training saw) | original.")] = "dequantized",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    json_: JsonOpt = False,
):
    """Fold a LoRA adapter into its base model and verify the result.

    [bold]Examples[/]

      ftcli merge runs/quickstart/adapter out/quickstart-merged

      ftcli merge runs/smollm2-qlora out/smol --into original --dtype bfloat16
    """
    from ftcli.merge import TOLERANCE
    from ftcli.merge import merge as do_merge
    from ftcli.ui import UI

    if dtype not in TOLERANCE:
        raise FtcliError(f"--dtype {dtype!r} is not one of: {', '.join(TOLERANCE)}")
    if into not in ("dequantized", "original"):
        raise FtcliError(f"--into {into!r} is not one of: dequantized, original")
    ui = UI(json_)
    samples = _run_test_features(adapter)
    m = do_merge(adapter, out_dir, base=base, dtype=dtype, into=into, samples=samples, force=force)
    ui.table(f"merged -> {m.out_dir}", [
        ("base", m.base_model), ("method", m.method), ("merged into", f"{m.into} weights, saved {m.dtype}"),
        ("LoRA modules folded", m.lora_modules_merged),
        ("max logit difference", f"{m.max_logit_diff:.3e} ({m.relative_diff:.2e} relative, tolerance {m.tolerance:g})"),
        ("prediction agreement", f"{m.prediction_agreement:.1%} on {m.samples} inputs"),
        *([(f"vs merging into {m.dequantized_vs_original['other']}",
            f"max logit difference {m.dequantized_vs_original['max_logit_diff']:.3e}, "
            f"agreement {m.dequantized_vs_original['prediction_agreement']:.1%}")] if m.dequantized_vs_original else []),
    ])
    return m.as_dict()


# ---------------------------------------------------------------- estimate-memory (ftcli/memory/)


@app.command("estimate-memory")
@command
def estimate_memory(
    recipe: Annotated[str | None, typer.Argument(help="Recipe file (or bundled recipe name). Omit it and give --model.")] = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", help="Model without a recipe: hub id, folder, .gguf, pkg:..., or a bundled card (llama-2-7b, mistral-7b, ...).")] = None,
    task: Annotated[str | None, typer.Option(help="causal_lm | classification (default: from the model's config).")] = None,
    method: Annotated[str, typer.Option(help="full | lora | qlora (without a recipe).")] = "lora",
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Micro-batch per device.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per example (padded length).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw | adam | sgd | rmsprop | adamw8bit | paged_adamw | paged_adamw8bit.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Weights of full/LoRA runs: float32 | bfloat16 | float16 (ftcli's default float32).")] = None,
    mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="no | bf16 | fp16 (default: bf16 on CUDA, no on CPU).")] = None,
    attn: Annotated[str | None, typer.Option("--attn", help="eager | sdpa | flash_attention_2.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank (without a recipe).")] = None,
    target_modules: Annotated[str | None, typer.Option("--target-modules", help="Comma-separated LoRA targets, or all-linear.")] = None,
    device: Annotated[str, typer.Option(help="auto | cuda | cpu: which device to plan for (auto: the one train would use).")] = "auto",
    num_devices: Annotated[int, typer.Option("--num-devices", help="Devices for the per-device table (1..N).")] = 1,
    strategy: Annotated[str, typer.Option(help="ddp | fsdp, for --num-devices > 1.")] = "ddp",
    budget: Annotated[str | None, typer.Option(help="Memory budget per device (24GB, 24GiB, 16000MB): the largest micro-batch that fits.")] = None,
    weights_only: Annotated[bool, typer.Option("--weights-only", help="Only the table of weights at each precision.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Run a few real training steps and compare the measured peak.")] = False,
    steps: Annotated[int, typer.Option(help="Steps for --measure.")] = 3,
    json_: JsonOpt = False,
):
    """Estimate a training run's peak memory before any weights are downloaded.

    [bold]Examples[/]

      ftcli estimate-memory recipes/quickstart.yaml

      ftcli estimate-memory --model mistral-7b --method qlora --batch-size 4 --seq-len 2048 --gradient-checkpointing

      ftcli estimate-memory --model meta-llama/Llama-2-7b-hf --weights-only

      ftcli estimate-memory --model llama-3-8b --method full --optimizer adamw8bit --num-devices 8 --strategy fsdp

      ftcli estimate-memory recipes/quickstart.yaml --budget 24GB

      ftcli estimate-memory recipes/quickstart.yaml --measure   [dim]# predicted vs measured peak[/]
    """
    from ftcli.memory.report import run_estimate

    if recipe is None and model is None:
        raise FtcliError("give a recipe, or --model NAME", hint="ftcli estimate-memory --model mistral-7b --method qlora")
    if recipe is not None and model is not None:
        raise FtcliError("give a recipe or --model, not both", hint="change a recipe's model with --set model.name=...")
    flags = {"task": task, "method": method, "batch_size": batch_size, "seq_len": seq_len,
             "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer, "dtype": dtype,
             "mixed_precision": mixed_precision, "attn_implementation": attn, "r": r, "target_modules": target_modules}
    return run_estimate(recipe=_load(recipe, set_) if recipe else None, model=model, flags=flags, device=device,
                        num_devices=num_devices, strategy=strategy, budget=budget, weights_only=weights_only,
                        measure=measure, steps=steps, json_mode=json_)


def _run_test_features(adapter: Path) -> list[dict] | None:
    """Tokenized test examples of the run an adapter came from, to verify the merge on."""
    from ftcli.merge import find_adapter

    run_dir = find_adapter(adapter).parent
    if not (run_dir / "recipe.yaml").exists() or not (run_dir / "data" / "test.jsonl").exists():
        return None
    from transformers import AutoTokenizer

    from ftcli.data import load_prepared, tokenize
    from ftcli.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    prepared = load_prepared(run_dir / "data")
    tok = AutoTokenizer.from_pretrained(find_adapter(adapter))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tokenize(prepared.splits["test"][:16], recipe, tok, prepared.label2id).features


def main() -> None:
    app()


if __name__ == "__main__":
    main()
