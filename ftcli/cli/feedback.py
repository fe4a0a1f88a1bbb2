"""``ftcli feedback export``: chat and serve feedback as preference data (ftcli/data/feedback_export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ftcli.cli.app import JsonOpt, app, command

feedback_app = typer.Typer(
    help="Turn the verdicts chat and serve recorded (/good, /bad, /fix) into training data.",
    no_args_is_help=True,
)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
@command
def export(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN_OR_FILE...",
            help="Run folders (their feedback.jsonl and feedback-rejected.jsonl) or feedback "
            "files (with the <stem>-rejected file beside each).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The preference data file to write (jsonl).")],
    json_: JsonOpt = False,
):
    """Write chat and serve feedback as preference data: each /fix a pair (chosen: the fix,
    rejected: the model's answer), each /good or /bad a KTO row (label desirable or undesirable).

    The same verdict given twice is kept once; a prompt+answer voted both ways is left out. Both
    are counted. `task: preference` reads the file as written (the bundled recipe feedback-dpo).

    [bold]Examples[/]

      ftcli feedback export runs/chat --out pairs.jsonl

      ftcli train feedback-dpo --set model.name=runs/chat --set data.path=pairs.jsonl
    """
    from ftcli.data.feedback_export import export as run_export
    from ftcli.data.feedback_export import summary
    from ftcli.ui import UI

    ui = UI(json_)
    result = run_export(sources, out)
    for line in summary(result):
        ui.info(line)
    ui.info(f"-> {out}")
    return {"out": str(out), **result.as_dict()}
