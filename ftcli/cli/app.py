"""The Typer app, the ``command`` wrapper and the options several commands share.

``command`` is the only place exceptions become exit codes: 0 success, 1 a user error (one clear
message, no traceback), 2 a usage error (typer/click), 130 interrupted. The command modules beside
this one register on ``app``; heavy libraries (torch, transformers) are imported inside the
commands, so ``--help`` and ``validate`` start fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from typing import Annotated

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


# Options more than one command takes, written once (each command's own options sit in its module).
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on stdout (human output goes to stderr)."),
]
RecipeArg = Annotated[str, typer.Argument(help="Recipe file (or the name of a bundled recipe).")]
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


def load_recipe_arg(recipe: str, overrides: list[str] | None):
    """The recipe a command names (a file or a bundled name) with its --set overrides; the notes
    the loader made (keys a --set dropped) go to stderr."""
    from ftcli.recipe import load_recipe, resolve_recipe_path

    r = load_recipe(resolve_recipe_path(recipe), overrides or [])
    for note in r.notes:
        sys.stderr.write(f"note: {note}\n")
    return r
