"""User-facing errors.

Every problem a user can fix (a typo in a recipe, a missing file, a hub id with no network) is
raised as an ``FtcliError``. Only ``cli/app.py``'s ``command`` catches them: it prints the message
and exits with code 1, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe: where it is, which key, what is wrong and how to fix it."""

    message: str
    key: str = ""
    file: str | None = None
    line: int | None = None
    hint: str | None = None

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{key}{self.message}{hint}"


class FtcliError(Exception):
    """An error the user can fix. ``str(err)`` is the whole message, written for a person."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


class RecipeError(FtcliError):
    """One or more problems in a recipe, all reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        self.partial = None  # the recipe's valid task + data sections, for `validate`'s data checks
        n = len(self.problems)
        head = "1 problem in the recipe:" if n == 1 else f"{n} problems in the recipe:"
        body = "\n".join("  " + p.render() for p in self.problems)
        super().__init__(f"{head}\n{body}")


class DataError(FtcliError):
    """The data cannot be read or does not fit the recipe."""


class SourceError(FtcliError):
    """A model or data source cannot be found or reached."""


class TrainingStopped(FtcliError):
    """The loss went NaN/Inf or spiked (train.max_loss_spike): training stopped, nothing saved."""


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved at ``step``."""

    def __init__(self, step: int, checkpoint=None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"interrupted at step {step}")
