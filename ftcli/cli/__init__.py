"""The command line. Thin: parse, load the recipe, call a stage, print the record.

``app.py`` holds the Typer app, the ``command`` wrapper (the one place an FtcliError becomes exit
code 1) and the options several commands share; each module beside it registers one group of
commands on that app when imported.
"""

from __future__ import annotations

import sys

# Imported for their commands, in the order ``ftcli --help`` lists them.
# isort: off
from ftcli.cli import train, data, evaluate, tune, merge, memory, serve, feedback  # noqa: F401

# isort: on
from ftcli.cli.app import app
from ftcli.cli.evaluate import optional_baseline_value

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """The ``ftcli`` console script and ``python -m ftcli``."""
    app(
        args=optional_baseline_value(list(sys.argv[1:] if argv is None else argv)),
        prog_name="ftcli",
    )
