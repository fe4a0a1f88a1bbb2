"""The command line. Thin: parse, load the recipe, call a stage, print the record.

This is the only place exceptions become exit codes: 0 success, 1 a user error (one clear
message, no traceback), 2 a usage error (typer/click), 130 interrupted. Heavy libraries (torch,
transformers) are imported inside the commands, so ``--help`` and ``validate`` start fast.
"""

from __future__ import annotations

import functools
import inspect
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

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on stdout (human output goes to stderr)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe key before validation, e.g. --set train.optimizer.lr=1.0e-4 (repeatable).",
    ),
]


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _reflow(doc: str | None) -> str | None:
    """Join each prose paragraph of a docstring into one line, so --help wraps it at the terminal's
    width; indented paragraphs (the examples) keep their lines."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.split("\n"))
        for p in paragraphs
    )


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
            from ftcli.ui import is_main_process

            if as_json and is_main_process():  # one JSON object on stdout, as on success
                _emit_json({"ok": False, "error": exc.render()})
            if is_main_process() or not as_json:
                sys.stderr.write(f"error: {exc.render()}\n")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None
        except _interrupted_type() as exc:
            where = f"; checkpoint saved at {exc.checkpoint}" if exc.checkpoint else ""
            sys.stderr.write(
                f"interrupted at step {exc.step}{where}\n  resume with: ftcli train <recipe> --resume\n"
            )
            raise typer.Exit(130) from None
        if as_json and result is not None:
            from ftcli.ui import is_main_process

            if is_main_process():
                _emit_json({"ok": True, **result} if isinstance(result, dict) else result)

    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper


def _interrupted_type():
    from ftcli.errors import Interrupted

    return Interrupted


def _load(recipe: str, overrides: list[str] | None):
    from ftcli.recipe import load_recipe, resolve_recipe_path

    return load_recipe(resolve_recipe_path(recipe), overrides or [])


@app.command()
@command
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")],
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's latest checkpoint.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Start over, replacing an existing run folder.")
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            min=1,
            help="Repeat the run with N seeds (train.seed 1..N, "
            "runs NAME-seed1..N) and report test metrics as mean ± std.",
        ),
    ] = None,
    no_memory_check: Annotated[
        bool,
        typer.Option(
            "--no-memory-check", help="Train even when the memory estimate exceeds the free memory."
        ),
    ] = False,
    json_: JsonOpt = False,
):
    """Run prepare -> adapt -> train -> evaluate -> merge into runs/<name>/.

    [bold]Examples[/]

      ftcli train recipes/quickstart.yaml

      ftcli train quickstart --set train.epochs=1 --set method.r=16

      ftcli train recipes/smollm2-chat-lora.yaml --resume

      torchrun --nproc_per_node 2 -m ftcli train recipes/quickstart.yaml   [dim]# 2 processes[/]

      ftcli train quickstart --seeds 3   [dim]# mean ± std over 3 seeds[/]
    """
    from ftcli.pipeline import train_run
    from ftcli.ui import UI

    r = _load(recipe, set_)
    if seeds is not None:
        from ftcli.sweeps import train_seeds

        return train_seeds(r, seeds, UI(json_), resume=resume, force=force)
    return train_run(r, UI(json_), resume=resume, force=force, memory_check=not no_memory_check)


@app.command()
@command
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")],
    set_: SetOpt = None,
    no_data: Annotated[
        bool, typer.Option("--no-data", help="Check only the recipe, not the data's columns.")
    ] = False,
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
        from ftcli.data.examples import check_columns
        from ftcli.data.read import read_source
        from ftcli.sources import resolve_data

        source = resolve_data(r.data.path)
        if source.kind != "hub":
            check_columns(r, read_source(source, r.data), r.data.path)
            checked.append("data columns")
    ui.info(
        f"[green]ok[/] {recipe}: {r.task}, {r.method.kind} on {r.model.name} ({', '.join(checked)} checked)"
    )
    return {
        "recipe": recipe,
        "name": r.name,
        "task": r.task,
        "method": r.method.kind,
        "checked": checked,
        "resolved": r.model_dump(mode="json"),
    }


@app.command("recipes")
@command
def list_recipes(json_: JsonOpt = False):
    """List the bundled recipes, one line each.

    [bold]Examples[/]

      ftcli recipes

      ftcli recipes --json
    """
    import yaml

    from ftcli.recipe import bundled_recipes_dir
    from ftcli.ui import UI

    rows = []
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        rows.append(
            {
                "file": str(path.relative_to(bundled_recipes_dir().parent)),
                "name": doc.get("name"),
                "task": doc.get("task"),
                "method": (doc.get("method") or {}).get("kind"),
                "model": (doc.get("model") or {}).get("name"),
                "description": doc.get("description", ""),
            }
        )
    UI(json_).table(
        "bundled recipes",
        [(r["file"], r["task"], r["method"], r["description"]) for r in rows],
        headers=("recipe", "task", "method", "what"),
    )
    return {"recipes": rows}


@app.command("eval")
@command
def eval_(
    run_dirs: Annotated[
        list[Path] | None, typer.Argument(help="Run folder(s) (default: the latest under runs/).")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            metavar="[base|probe|RUN_DIR]",
            help="Compare with the base model as the run started (base, the default), a linear probe on the frozen "
            "base (probe), or another run (RUN_DIR). Put RUN_DIR before this option.",
        ),
    ] = None,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Average the runs' probabilities; report the ensemble beside each member.",
        ),
    ] = False,
    split: Annotated[
        str, typer.Option(help="Which prepared split to score (without --baseline).")
    ] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: RUN_DIR/eval, RUN_DIR/eval-ensemble)."),
    ] = None,
    resamples: Annotated[
        int, typer.Option(min=99, help="Bootstrap / permutation resamples.")
    ] = 9999,
    seed: Annotated[int, typer.Option(help="Seed of the resampling and the perturbations.")] = 0,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness/--no-robustness", help="Also score perturbed, empty and very long inputs."
        ),
    ] = True,
    json_: JsonOpt = False,
):
    """Score a finished run on its sealed test split; with --baseline, prove whether fine-tuning helped.

    With --baseline the fine-tuned model and the baseline answer the same sealed test examples; the
    report gives both metrics, paired-bootstrap 95% intervals, McNemar / paired permutation tests, a
    verdict (improved, no significant change, regressed), failures, overfitting and robustness, in
    RUN_DIR/eval/ (report.json, report.md, report.html, predictions.jsonl).

    [bold]Examples[/]

      ftcli eval runs/quickstart

      ftcli eval runs/quickstart --baseline

      ftcli eval runs/quickstart --baseline probe

      ftcli eval runs/quickstart-r32 --baseline runs/quickstart   [dim]# r=32 vs r=8[/]

      ftcli eval runs/q-seed1 runs/q-seed2 runs/q-seed3 --ensemble

      ftcli eval --baseline --json
    """
    from ftcli.pipeline import evaluate_run
    from ftcli.rundir import latest_run
    from ftcli.ui import UI

    ui = UI(json_)
    dirs = list(run_dirs or []) or [latest_run()]
    if ensemble:
        if len(dirs) < 2:
            raise FtcliError(
                "--ensemble needs at least two run folders",
                hint="ftcli eval runs/A runs/B --ensemble",
            )
        if baseline is not None:
            raise FtcliError(
                "--ensemble compares the ensemble with its members; it takes no --baseline"
            )
        from ftcli.evaluation.ensemble import eval_ensemble

        return eval_ensemble(dirs, ui, out, resamples, seed)
    if len(dirs) > 1:
        raise FtcliError(
            f"{len(dirs)} run folders given: evaluate one, or several with --ensemble",
            hint="to compare two runs: ftcli eval runs/A --baseline runs/B",
        )
    if baseline is None:
        return evaluate_run(dirs[0], ui, split)
    if split != "test":
        raise FtcliError("--baseline compares on the sealed test split only", hint="drop --split")
    from ftcli.evaluation.compare import eval_baseline

    return eval_baseline(dirs[0], baseline, ui, out, resamples, seed, robustness)


@app.command()
@command
def cv(
    recipe: Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")],
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of folds K.")] = 5,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing fold runs.")] = False,
    json_: JsonOpt = False,
):
    """K-fold cross-validation: train K runs, each tested on a fold it never saw; mean ± std.

    The examples (after cleaning) are split into K folds (stratified by label for classification,
    seeded by data.split.seed). Run k trains on the other folds (minus the recipe's validation share)
    and is tested on fold k. Runs: <output_dir>/NAME-fold1..K; summary: <output_dir>/NAME-cv/summary.json.

    [bold]Examples[/]

      ftcli cv recipes/quickstart.yaml --folds 5

      ftcli cv quickstart --folds 3 --set train.epochs=1 --json
    """
    from ftcli.sweeps import cross_validate
    from ftcli.ui import UI

    return cross_validate(_load(recipe, set_), folds, UI(json_), force=force)


@app.command()
@command
def tune(
    recipe: Annotated[str, typer.Argument(help="Recipe file with a tune: section.")],
    set_: SetOpt = None,
    trials: Annotated[
        int | None,
        typer.Option("--trials", min=1, help="Trials the study should hold (default tune.trials)."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0, help="Start no new trial after this many seconds."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue trials stopped by Ctrl-C from their checkpoint."),
    ] = False,
    json_: JsonOpt = False,
):
    """Hyperparameter search on Optuna; trials are selected on validation only.

    Each trial is a run folder <output_dir>/NAME/tune/trial-NNN/ (the recipe with the trial's
    values set as --set would). Weak trials are pruned on their validation curve. At the end the
    best trial is scored once on the sealed test split; tune/best.yaml is its complete recipe,
    tune/report.html the history, importances and curves. Running it again continues the study;
    several processes on one tune.storage share it.

    [bold]Examples[/]

      ftcli tune study.yaml   [dim]# a recipe with a tune: section[/]

      ftcli tune my.yaml --trials 12 --timeout 3600 --json

      ftcli tune my.yaml --set tune.storage=shared/study.log   [dim]# run it on several machines[/]
    """
    from ftcli.tune import tune as run_study
    from ftcli.ui import UI

    return run_study(_load(recipe, set_), UI(json_), trials=trials, timeout=timeout, resume=resume)


@app.command()
@command
def merge(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="ADAPTER_DIR",
            help="Adapter folder, or a run folder (adapter/ or, for full fine-tuning, model/).",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write the merged model (a new folder).")
    ],
    base: Annotated[
        str | None,
        typer.Option(help="Base model to merge into (default: the one the adapter records)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="float32 | bfloat16 | float16 for the saved weights.")
    ] = "float32",
    into: Annotated[
        str,
        typer.Option(
            help="QLoRA: dequantized (the NF4 weights training saw) | original (full precision)."
        ),
    ] = "dequantized",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    json_: JsonOpt = False,
):
    """Fold a LoRA adapter into its base model, verify the result, write a plain transformers folder.

    The merged model and base + adapter are run on the same inputs (the run's test examples, else
    built-in text): the fold is checked in float32, the written folder is loaded back with plain
    transformers in its dtype and checked again. Above the tolerance it fails (exit 1) and writes
    nothing. A full fine-tuning run is exported in --dtype and checked the same way.

    [bold]Examples[/]

      ftcli merge runs/quickstart out/quickstart-merged

      ftcli merge runs/smollm2-qlora/adapter out/smol --into original --dtype bfloat16

      ftcli merge my-adapter/ out/m --base HuggingFaceTB/SmolLM2-135M-Instruct --force --json
    """
    from ftcli.merge import DTYPES, INTO
    from ftcli.merge import merge as do_merge
    from ftcli.ui import UI

    if dtype not in DTYPES:
        raise FtcliError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if into not in INTO:
        raise FtcliError(f"--into {into!r} is not one of: {', '.join(INTO)}")
    ui = UI(json_)
    ui.step(f"merge    {source} -> {out_dir}")
    m = do_merge(source, out_dir, base=base, dtype=dtype, into=into, force=force)
    rows = [
        ("base", m.base_model),
        ("method", m.method),
        ("merged into", f"{m.into} weights, saved {m.dtype}"),
        ("parameters", f"{m.parameters:,}"),
        ("LoRA modules folded", m.lora_modules_merged),
    ]
    if m.saved_modules:
        rows.append(("saved modules", ", ".join(m.saved_modules)))
    if m.fold_check:
        fc = m.fold_check
        rows.append(
            (
                "merge check (float32)",
                f"max logit difference {fc['max_logit_diff']:.3e} "
                f"({fc['relative_diff']:.2e} relative, tolerance {fc['tolerance']:g}), "
                f"predictions agree {fc['prediction_agreement']:.1%}",
            )
        )
    rows.append(
        (
            f"saved folder ({m.dtype})",
            f"max logit difference {m.max_logit_diff:.3e} "
            f"({m.relative_diff:.2e} relative, tolerance {m.tolerance:g}), "
            f"predictions agree {m.prediction_agreement:.1%} on {m.samples} {m.sample_source}",
        )
    )
    if m.dequantized_vs_original:
        d = m.dequantized_vs_original
        rows.append(
            (
                f"vs merging into {d['other']}",
                f"max logit difference {d['max_logit_diff']:.3e} "
                f"({d['relative_diff']:.2e} relative), predictions agree {d['prediction_agreement']:.1%}",
            )
        )
    rows.append(("written", f"{m.bytes_written / 2**20:.1f} MiB in {m.seconds:.1f} s"))
    ui.table(f"merged -> {m.out_dir} (verified)", rows)
    return m.as_dict()


# ---------------------------------------------------------------- estimate-memory (ftcli/memory/)


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
        str | None,
        typer.Option(help="causal_lm | classification (default: from the model's config)."),
    ] = None,
    method: Annotated[str, typer.Option(help="full | lora | qlora (without a recipe).")] = "lora",
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
        str | None,
        typer.Option(
            help="adamw | adam | sgd | rmsprop | adamw8bit | paged_adamw | paged_adamw8bit."
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Weights of full/LoRA runs: float32 | bfloat16 | float16 (ftcli's default float32)."
        ),
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision", help="no | bf16 | fp16 (default: bf16 on CUDA, no on CPU)."
        ),
    ] = None,
    attn: Annotated[
        str | None, typer.Option("--attn", help="eager | sdpa | flash_attention_2.")
    ] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank (without a recipe).")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option("--target-modules", help="Comma-separated LoRA targets, or all-linear."),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="auto | cuda | cpu: which device to plan for (auto: the one train would use)."
        ),
    ] = "auto",
    num_devices: Annotated[
        int, typer.Option("--num-devices", help="Devices for the per-device table (1..N).")
    ] = 1,
    strategy: Annotated[str, typer.Option(help="ddp | fsdp, for --num-devices > 1.")] = "ddp",
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
        raise FtcliError(
            "give a recipe, or --model NAME",
            hint="ftcli estimate-memory --model mistral-7b --method qlora",
        )
    if recipe is not None and model is not None:
        raise FtcliError(
            "give a recipe or --model, not both",
            hint="change a recipe's model with --set model.name=...",
        )
    flags = {
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
    }
    return run_estimate(
        recipe=_load(recipe, set_) if recipe else None,
        model=model,
        flags=flags,
        device=device,
        num_devices=num_devices,
        strategy=strategy,
        budget=budget,
        weights_only=weights_only,
        measure=measure,
        steps=steps,
        json_mode=json_,
    )


AdapterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="Adapter folder or run (NAME=PATH to name it); repeat to serve several on one base.",
    ),
]
FeedbackOpt = Annotated[
    Path | None,
    typer.Option(
        "--feedback",
        help="Where verdicts go (JSON lines a recipe's data.path reads); "
        "bad answers without a fix go to <stem>-rejected.jsonl beside it.",
    ),
]


@app.command()
@command
def predict(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL_OR_RUN",
            help="Merged/model folder, run folder, adapter folder or model spec "
            "(with --adapter: the base; default: the adapters' own).",
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", help="Text to label or prompt to answer (repeatable)."),
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="JSONL/CSV/... file with a text column (or messages); "
            "an 'adapter' column picks the adapter per row.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Write predictions here (.jsonl or .csv).")
    ] = None,
    adapter: AdapterOpt = None,
    text_column: Annotated[str, typer.Option(help="Column of --input holding the text.")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 32,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Causal LMs: tokens to generate per answer.")
    ] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Causal LMs: 0 = greedy.")] = 0.0,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="Causal LMs: continue the text as is, without the chat template."
        ),
    ] = False,
    review: Annotated[
        bool,
        typer.Option(
            "--review", help="After predicting, mark each answer /good, /bad or /fix ANSWER."
        ),
    ] = False,
    feedback: FeedbackOpt = None,
    json_: JsonOpt = False,
):
    """Label texts (with probabilities) or generate answers with a fine-tuned model, batched.

    [bold]Examples[/]

      ftcli predict runs/quickstart --text "A gorgeous, moving film." --text "Dull and far too long."

      ftcli predict out/quickstart-merged --input reviews.csv --output predictions.jsonl

      ftcli predict --adapter runs/a --adapter runs/b --text "..."     [dim]# one base, both adapters[/]

      ftcli predict runs/quickstart --input new.jsonl --review --feedback feedback.jsonl
    """
    from ftcli.serve.batch import predict as do_predict
    from ftcli.serve.batch import progress_bar, read_requests, write_predictions
    from ftcli.serve.chat import review_loop
    from ftcli.serve.feedback import FeedbackLog
    from ftcli.serve.predictor import load_predictor
    from ftcli.ui import UI

    ui = UI(json_)
    requests = read_requests(text, input_, text_column)
    pred = load_predictor(model, adapter)
    total = len(requests) * (
        1 if all(r.get("adapter") for r in requests) else max(1, len(pred.adapters))
    )
    bar, advance = progress_bar(ui.console, total, "predict")
    with bar:
        rows = do_predict(pred, requests, batch_size, max_new_tokens, temperature, raw, advance)
    if output:
        write_predictions(rows, output)
        ui.info(f"{len(rows)} predictions -> {output}")
    lead = ("adapter",) if pred.adapters else ()
    if pred.task == "classification":
        table = [
            (*((r["adapter"],) if lead else ()), r["text"][:60], r["label"], f"{r['score']:.3f}")
            for r in rows[:50]
        ]
        ui.table(
            f"predictions ({pred.source})", table, headers=(*lead, "text", "label", "probability")
        )
    else:
        table = [
            (
                *((r["adapter"],) if lead else ()),
                (r.get("text") or r["messages"][-1]["content"])[:50],
                r["generation"][:200],
            )
            for r in rows[:50]
        ]
        ui.table(f"generations ({pred.source})", table, headers=(*lead, "prompt", "answer"))
    if len(rows) > 50:
        ui.info(
            f"... {len(rows) - 50} more"
            + ("" if output else " (use --output FILE or --json for all)")
        )
    result: dict = {"model": pred.source, "task": pred.task, "count": len(rows)}
    if review:
        log = FeedbackLog(feedback or Path("feedback.jsonl"), pred.source)
        result["feedback"] = review_loop(
            pred, rows, sys.stdin, sys.stderr if json_ else sys.stdout, log
        )
        result["feedback_file"] = str(log.path)
        ui.info(f"feedback: {result['feedback']} -> {log.path}")
    if output:
        result["output"] = str(output)
    else:
        result["predictions"] = rows
    return result


@app.command()
@command
def chat(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL_OR_RUN",
            help="Merged/model folder, run folder, adapter folder or model spec "
            "(with --adapter: the base).",
        ),
    ] = None,
    adapter: AdapterOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt for the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    feedback: Annotated[
        Path,
        typer.Option(
            "--feedback",
            help="Where /good and /fix answers go (a recipe's data.path "
            "reads it); /bad ones go to <stem>-rejected.jsonl.",
        ),
    ] = Path("feedback.jsonl"),
    json_: JsonOpt = False,
):
    """Talk to a causal LM in the terminal, with its chat template.

    Commands: /good, /bad, /fix ANSWER (feedback on the last answer), /switch NAME and /adapters
    (with several --adapter), /reset, /help, /quit.

    [bold]Examples[/]

      ftcli chat runs/smollm2-chat

      ftcli chat --adapter polite=runs/a --adapter terse=runs/b --system "You are helpful."
    """
    from ftcli.serve.chat import chat_loop
    from ftcli.serve.feedback import FeedbackLog
    from ftcli.serve.predictor import load_predictor

    pred = load_predictor(model, adapter)
    log = FeedbackLog(feedback, pred.source)
    return chat_loop(
        pred,
        sys.stdin,
        sys.stderr if json_ else sys.stdout,
        log,
        system,
        max_new_tokens,
        temperature,
    )


def optional_baseline_value(argv: list[str]) -> list[str]:
    """``ftcli eval RUN --baseline`` (no value) means ``--baseline base``. Typer cannot declare an
    option whose value may be left out, so the bare flag is completed here, before parsing."""
    if "eval" not in argv:
        return argv
    out = list(argv)
    for i in range(len(out) - 1, -1, -1):
        if out[i] == "--baseline" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "base")
    return out


def main(argv: list[str] | None = None) -> None:
    app(
        args=optional_baseline_value(list(sys.argv[1:] if argv is None else argv)),
        prog_name="ftcli",
    )


if __name__ == "__main__":
    main()
