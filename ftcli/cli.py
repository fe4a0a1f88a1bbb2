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
from typing import Annotated, Literal

import typer

from ftcli.errors import FtcliError


def _flags_take_no_value() -> None:
    """typer 0.29 prints a boolean flag as ``--resume <bool>``, as if it took a value: show
    nothing after a flag (``--resume``, ``--robustness/--no-robustness``), as click does."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:  # a typer without the type column: nothing to fix
        return

    def display_type_rich(self, ctx):
        return "" if self.is_flag and self.metavar is None else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()

app = typer.Typer(
    name="ftcli",
    help="Fine-tune pre-trained models from a YAML recipe: full, LoRA or QLoRA; evaluated against the "
    "base model, merged and verified.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show the libraries' own warnings and log lines as they come (otherwise they are "
            "kept in the run folder's libraries.log).",
        ),
    ] = False,
) -> None:
    """Fine-tune pre-trained models from a YAML recipe."""
    if verbose:
        import os

        os.environ["FTCLI_VERBOSE"] = "1"  # launched ranks and subprocesses see it too


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

TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let the model run its own Python code (transformers' trust_remote_code). Never "
        "taken from a folder's record: only this flag or your own recipe turns it on.",
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
            from ftcli.sources import trusting

            with trusting(kwargs.get("trust_remote_code", False)):
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

    r = load_recipe(resolve_recipe_path(recipe), overrides or [])
    for note in r.notes:
        sys.stderr.write(f"note: {note}\n")
    return r


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
        from ftcli.tune.repeats import train_seeds

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
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Exit 1 on warnings and when the data's columns could not be checked."
        ),
    ] = False,
    json_: JsonOpt = False,
):
    """Check a recipe and its data without loading any model: every problem at once.

    The data checks: each source exists, the named columns are there and hold text, the labels
    occur, and the splits are not empty (a hub dataset is not downloaded for them).

    [bold]Examples[/]

      ftcli validate recipes/quickstart.yaml

      ftcli validate my.yaml --set method.kind=qlora --json
    """
    from ftcli.errors import RecipeError
    from ftcli.ui import UI

    ui = UI(json_)
    checked = ["schema"]
    try:
        r = _load(recipe, set_)
    except RecipeError as exc:  # report the data's problems too, if its section is valid
        if no_data or exc.partial is None:
            raise
        from ftcli.data.check import data_problems

        raise RecipeError(exc.problems + data_problems(exc.partial)[0]) from None
    notes = [w.render() for w in r.warnings]
    if not no_data:
        from ftcli.data.check import data_problems

        problems, done, unchecked = data_problems(r)
        if problems:
            raise RecipeError(problems)
        checked += done
        notes += unchecked
    for note in notes:
        ui.warn(note)
    if strict and notes:
        raise FtcliError(
            f"{len(notes)} warning(s) with --strict", hint="fix them, or validate without --strict"
        )
    ui.info(
        f"[green]ok[/] {recipe}: {r.task}, {r.method.kind} on {r.model.name} ({', '.join(checked)} checked)"
    )
    return {
        "recipe": recipe,
        "name": r.name,
        "task": r.task,
        "method": r.method.kind,
        "checked": checked,
        "warnings": notes,
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

    from ftcli.recipe import bundled_recipes_dir, load_recipe
    from ftcli.ui import UI

    rows = []
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        r = load_recipe(path)  # overlays (extends:) listed as they resolve
        rows.append(
            {
                "file": str(path.relative_to(bundled_recipes_dir().parent)),
                "name": r.name,
                "task": r.task,
                "method": r.method.kind,
                "model": r.model.name,
                "description": r.description or "",
            }
        )
    ui = UI(json_)
    ui.table(
        "bundled recipes",
        [(r["file"], r["task"], r["method"], r["description"]) for r in rows],
        headers=("recipe", "task", "method", "what"),
        whole=(0,),
    )
    return {"recipes": rows}


@app.command("eval")
@command
def eval_(
    run_dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Run folder(s), or a recipe file for its run folder (default: the latest run "
            "under --output-dir)."
        ),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            metavar="[probe|tfidf|majority|base|RUN_DIR]",
            help="Compare with a baseline (repeatable: several in one report). Classification: probe (a "
            "linear probe on the frozen base, the default), tfidf (TF-IDF + logistic regression on the "
            "train split), majority (the most frequent label), base (the untrained start). Causal LM: "
            "base (the default). RUN_DIR: another run. Put RUN_DIR before this option.",
        ),
    ] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            "--benchmark",
            metavar="TASK[,TASK...]",
            help="lm-evaluation-harness task(s), base vs fine-tuned, paired per document (causal LM "
            "runs). Bundled offline tasks: rt_sentiment, chatterbot_qa.",
        ),
    ] = None,
    tasks_path: Annotated[
        Path | None,
        typer.Option(
            "--tasks-path", help="Folder of your own lm-eval task YAMLs (local data: offline)."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="--benchmark: score the first N documents of each task."),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(min=0, help="--benchmark: few-shot examples (default: the task's)."),
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
        typer.Option(
            help="Report folder (default: RUN_DIR/eval, one folder per baseline in it plus an "
            "index; RUN_DIR/eval-ensemble)."
        ),
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
    output_dir: Annotated[
        Path,
        typer.Option(
            "--output-dir", help="Where to look for the latest run when no RUN_DIR is given."
        ),
    ] = Path("runs"),
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Score a finished run on its sealed test split; with --baseline, prove whether fine-tuning helped.

    With --baseline the fine-tuned model and the baseline answer the same sealed test examples; the
    report gives both metrics, paired-bootstrap 95% intervals, McNemar / paired permutation tests, a
    verdict (improved, no significant change, regressed), failures, overfitting and robustness, in
    its own folder RUN_DIR/eval/<baseline>/ (base, probe, tfidf, majority, vs-<run>), and
    RUN_DIR/eval/index.html lists every report side by side. With --benchmark the base and the
    fine-tuned model run lm-evaluation-harness tasks, paired per document (RUN_DIR/eval/benchmarks/).

    [bold]Examples[/]

      ftcli eval runs/quickstart

      ftcli eval runs/quickstart --baseline

      ftcli eval runs/quickstart --baseline probe --baseline tfidf --baseline majority

      ftcli eval runs/smollm2-chat-lora --benchmark rt_sentiment,chatterbot_qa --limit 100

      ftcli eval runs/quickstart-r32 --baseline runs/quickstart   [dim]# r=32 vs r=8[/]

      ftcli eval runs/q-seed1 runs/q-seed2 runs/q-seed3 --ensemble

      ftcli eval --baseline --json
    """
    from ftcli.pipeline import evaluate_run
    from ftcli.rundir import latest_run
    from ftcli.ui import UI

    ui = UI(json_)
    named = [
        b for b in baseline or [] if b not in ("default", "base", "probe", "tfidf", "majority")
    ]
    if not run_dirs and named:
        raise FtcliError(
            f"--baseline {named[0]} names the run to compare with, but not the run to score",
            hint=f"give both: ftcli eval RUN_DIR --baseline {named[0]}",
        )
    dirs = [_run_folder(d) for d in run_dirs or []] or [latest_run(output_dir)]
    bench_only = {"--tasks-path": tasks_path, "--limit": limit, "--num-fewshot": num_fewshot}
    stray = [k for k, v in bench_only.items() if v is not None]
    if stray and not benchmark:
        raise FtcliError(
            f"{', '.join(stray)} applies to --benchmark only", hint="add --benchmark TASK"
        )
    if ensemble:
        if len(dirs) < 2:
            raise FtcliError(
                "--ensemble needs at least two run folders",
                hint="ftcli eval runs/A runs/B --ensemble",
            )
        if baseline or benchmark:
            raise FtcliError(
                "--ensemble compares the ensemble with its members; it takes no --baseline or --benchmark"
            )
        from ftcli.evaluation.ensemble import eval_ensemble

        return eval_ensemble(dirs, ui, out, resamples, seed)
    if len(dirs) > 1:
        raise FtcliError(
            f"{len(dirs)} run folders given: evaluate one, or several with --ensemble",
            hint="to compare two runs: ftcli eval runs/A --baseline runs/B",
        )
    if not baseline and not benchmark:
        return evaluate_run(dirs[0], ui, split)
    if split != "test":
        raise FtcliError(
            "--baseline and --benchmark compare on the sealed test split only", hint="drop --split"
        )
    result: dict = {}
    if baseline:
        from ftcli.evaluation.compare import eval_baseline

        result = eval_baseline(dirs[0], baseline, ui, out, resamples, seed, robustness)
    if benchmark:
        from ftcli.evaluation.benchmark import benchmark_run

        bench = benchmark_run(
            dirs[0], benchmark, ui, out, tasks_path, limit, num_fewshot, resamples, seed
        )
        result = {**result, "benchmarks": bench} if baseline else bench
    return result


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
    from ftcli.tune.repeats import cross_validate
    from ftcli.ui import UI

    return cross_validate(_load(recipe, set_), folds, UI(json_), force=force)


def _run_folder(path: Path) -> Path:
    """A run folder as given, or the run folder of a recipe file (its output_dir and name)."""
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _load(str(path), []).run_dir
    return path


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
            metavar="RUN_OR_TRAINED_DIR",
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
    trust_remote_code: TrustOpt = False,
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

OPTIMIZER_NAMES = ("adamw", "adam", "sgd", "rmsprop", "adamw8bit", "paged_adamw", "paged_adamw8bit")
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
            help="Default: bf16 on CUDA (fp16 on a --gpu without bf16), no on the CPU.",
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
        "loss_path": loss_path,
    }
    return run_estimate(
        recipe=_load(recipe, set_) if recipe else None,
        model=model,
        flags=flags,
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
    trust_remote_code: TrustOpt = False,
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
    system: Annotated[
        str | None,
        typer.Option(
            help="System prompt for the conversation (default: the run's data.system_prompt; "
            "--system '' for none)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    feedback: Annotated[
        Path | None,
        typer.Option(
            "--feedback",
            help="Where /good and /fix answers go (a recipe's data.path reads it; default: "
            "feedback.jsonl in the run's folder, else here); /bad ones go to <stem>-rejected.jsonl.",
        ),
    ] = None,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Talk to a causal LM in the terminal, with its chat template; answers stream as they are made.

    Commands: /good, /bad, /fix ANSWER (feedback on the last answer), /switch NAME and /adapters
    (with several --adapter), /reset, /help, /quit. Ctrl-C stops an answer; a second Ctrl-C leaves.

    [bold]Examples[/]

      ftcli chat runs/smollm2-chat

      ftcli chat --adapter polite=runs/a --adapter terse=runs/b --system "You are helpful."
    """
    from ftcli.serve.chat import chat_loop, chat_run, run_system_prompt
    from ftcli.serve.feedback import FeedbackLog
    from ftcli.serve.predictor import load_predictor
    from ftcli.ui import UI

    ui = UI(json_)
    run_dir = chat_run(model, adapter)
    with ui.status(f"loading {model or ', '.join(adapter or [])} ..."):
        pred = load_predictor(model, adapter)
    if system is None:
        system = run_system_prompt(run_dir)
    log = FeedbackLog(feedback or (run_dir or Path()) / "feedback.jsonl", pred.source)
    return chat_loop(
        pred,
        sys.stdin,
        sys.stderr if json_ else sys.stdout,
        log,
        system or None,
        max_new_tokens,
        temperature,
    )


@app.command()
@command
def serve(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL_OR_RUN",
            help="Merged/model folder, run folder, adapter folder or model spec "
            "(with --adapter: the base; default: the adapters' own).",
        ),
    ] = None,
    adapter: AdapterOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="FTCLI_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/ (default: no key).",
        ),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most waiting requests of one adapter run together.")
    ] = 8,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Most requests waiting; more get 429 (retry).")
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Most tokens one answer may ask for (max_tokens).")
    ] = 256,
    max_body: Annotated[
        int, typer.Option(min=1, help="Largest request body in bytes; more get 413.")
    ] = 1_000_000,
    feedback: Annotated[
        Path | None,
        typer.Option(
            "--feedback",
            help="Turn on POST /v1/feedback, writing to this file (the rows chat writes; "
            "bad answers go to <stem>-rejected.jsonl). Off by default.",
        ),
    ] = None,
    feedback_max_rows: Annotated[
        int, typer.Option(min=1, help="Most rows in the feedback files; more get 507.")
    ] = 10_000,
    max_prompts: Annotated[
        int, typer.Option(min=1, help="Most prompts (or inputs) in one request.")
    ] = 16,
    max_prompt_chars: Annotated[
        int, typer.Option(min=1, help="Longest prompt in characters; longer get 413.")
    ] = 100_000,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds a request may wait and run; then 504.")
    ] = 300.0,
    json_: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
):
    """Serve a fine-tuned model over an OpenAI-compatible HTTP API, adapters picked per request.

    Endpoints: POST /v1/chat/completions (stream or not), /v1/completions, /v1/classify,
    /v1/feedback; GET /v1/models, /health. The request's model field picks the adapter (or
    the base); requests for one adapter are batched. Needs the serve extra: pip install 'ftcli\\[serve]'.

    [bold]Examples[/]

      ftcli serve runs/smollm2-chat-lora

      ftcli serve --adapter polite=runs/a --adapter terse=runs/b --port 8080 --api-key "$KEY"
    """
    try:
        from ftcli.serve.server import ServeConfig
        from ftcli.serve.server import serve as run_server
    except ImportError as exc:
        raise FtcliError(
            f"ftcli serve needs {exc.name or 'fastapi and uvicorn'}",
            hint="pip install 'ftcli[serve]'",
        ) from None
    from ftcli.ui import UI

    ui = UI(json_)
    limits = (feedback_max_rows, max_prompts, max_prompt_chars, timeout)
    cfg = ServeConfig(
        host, port, api_key, max_batch_size, max_queue, max_tokens, max_body, feedback, *limits
    )
    return run_server(model, adapter, cfg, say=ui.info)


def optional_baseline_value(argv: list[str]) -> list[str]:
    """``ftcli eval RUN --baseline`` (no value) means ``--baseline default``: the task's fair bar
    (the linear probe for classification, the base model for a causal LM). Typer cannot declare an
    option whose value may be left out, so the bare flag is completed here, before parsing."""
    if "eval" not in argv:
        return argv
    out = list(argv)
    for i in range(len(out) - 1, -1, -1):
        if out[i] == "--baseline" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "default")
    return out


def main(argv: list[str] | None = None) -> None:
    app(
        args=optional_baseline_value(list(sys.argv[1:] if argv is None else argv)),
        prog_name="ftcli",
    )


if __name__ == "__main__":
    main()
