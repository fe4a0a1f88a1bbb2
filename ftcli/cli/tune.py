"""``ftcli tune``: a hyperparameter search on Optuna, selected on validation only."""

from __future__ import annotations

from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, SetOpt, app, command, load_recipe_arg


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

    return run_study(
        load_recipe_arg(recipe, set_), UI(json_), trials=trials, timeout=timeout, resume=resume
    )
