"""``ftcli train``, ``validate`` and ``recipes``: a recipe in, a run (or a verdict on the recipe) out."""

from __future__ import annotations

from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, RecipeArg, SetOpt, app, command, load_recipe_arg
from ftcli.errors import FtcliError


@app.command()
@command
def train(
    recipe: RecipeArg,
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

    r = load_recipe_arg(recipe, set_)
    if seeds is not None:
        from ftcli.tune.repeats import train_seeds

        return train_seeds(r, seeds, UI(json_), resume=resume, force=force)
    return train_run(r, UI(json_), resume=resume, force=force, memory_check=not no_memory_check)


@app.command()
@command
def validate(
    recipe: RecipeArg,
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
    from ftcli.data.check import check_recipe
    from ftcli.ui import UI

    ui = UI(json_)
    r, checked, notes = check_recipe(lambda: load_recipe_arg(recipe, set_), data=not no_data)
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
