"""``ftcli eval`` and ``cv``: score a finished run, compare it with baselines, or cross-validate a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftcli.cli.app import (
    JsonOpt,
    RecipeArg,
    SetOpt,
    TrustOpt,
    app,
    command,
    load_recipe_arg,
)


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
    judge: Annotated[
        Path | None,
        typer.Option(
            "--judge",
            help="Preference runs, with --baseline: start and tuned answer the test prompts, this "
            "run scores both (a task reward run, or a classifier with --judge-label).",
        ),
    ] = None,
    judge_label: Annotated[
        str | None,
        typer.Option(
            "--judge-label", help="--judge with a classifier: the label whose probability scores."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="--judge: answer length bound (default eval.max_new_tokens).",
        ),
    ] = None,
    prompts: Annotated[
        int | None,
        typer.Option(
            "--prompts",
            min=1,
            help="--judge: how many held-out prompts to answer (default eval.generate_examples).",
        ),
    ] = None,
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

      ftcli eval runs/dpo --baseline --judge runs/sentiment --judge-label positive

      ftcli eval --baseline --json
    """
    from ftcli.evaluation.modes import (
        check_generation,
        check_run_to_score,
        compare_run,
        eval_mode,
    )
    from ftcli.pipeline import evaluate_run
    from ftcli.rundir import latest_run
    from ftcli.ui import UI

    ui = UI(json_)
    check_run_to_score(baseline, given=bool(run_dirs))
    generation = {
        "judge": judge,
        "judge_label": judge_label,
        "max_new_tokens": max_new_tokens,
        "prompts": prompts,
    }
    check_generation(generation, baseline)
    dirs = [_run_folder(d) for d in run_dirs or []] or [latest_run(output_dir)]
    bench_only = {"--tasks-path": tasks_path, "--limit": limit, "--num-fewshot": num_fewshot}
    mode = eval_mode(len(dirs), baseline, benchmark, ensemble, split, bench_only)
    if mode == "ensemble":
        from ftcli.evaluation.ensemble import eval_ensemble

        return eval_ensemble(dirs, ui, out, resamples, seed)
    if mode == "split":
        return evaluate_run(dirs[0], ui, split)
    return compare_run(
        dirs[0],
        ui,
        baseline,
        benchmark,
        out,
        tasks_path,
        limit,
        num_fewshot,
        resamples,
        seed,
        robustness,
        generation=generation,
    )


@app.command()
@command
def cv(
    recipe: RecipeArg,
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

    return cross_validate(load_recipe_arg(recipe, set_), folds, UI(json_), force=force)


def _run_folder(path: Path) -> Path:
    """A run folder as given, or the run folder of a recipe file (its output_dir and name)."""
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_recipe_arg(str(path), []).run_dir
    return path


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
