"""Human output: rich tables and a training progress bar. With ``--json`` all of it goes to stderr
so stdout carries exactly one JSON object. Only the main process of a multi-process run prints."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
import warnings

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# libraries that attach a stderr handler of their own (they never reach the root logger): kept
# at ERROR unless --verbose; everything else propagates to the root and is captured below
_OWN_HANDLERS = ("transformers", "datasets", "huggingface_hub")
_LIBRARIES = (*_OWN_HANDLERS, "peft", "accelerate", "bitsandbytes", "kernels", "torch.distributed")


class LibraryLog(logging.Handler):
    """Third-party log records and Python warnings, held instead of printed: ftcli owns the
    terminal, so an ``error:`` line is the first line a user sees and ``--json`` stdout is one
    object. ``--verbose`` (or FTCLI_VERBOSE=1) shows them as they come; a run keeps them in its
    folder (``libraries.log``)."""

    def __init__(self, keep: int = 2000):
        super().__init__(level=logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.verbose = False
        self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a library's bad format string must not break the run
            line = f"{record.levelname} {record.name}: {record.msg!r}"
        self.lines.append(line)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        if self.verbose:
            sys.stderr.write(f"  [{record.name}] {record.getMessage()}\n")

    def keep_in(self, path) -> None:
        """Write what was captured so far to ``path`` (appending: a resumed run keeps its log) and
        every later record too."""
        if self.file is not None:
            self.file.close()
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process' life)
        for line in self.lines:
            self.file.write(line + "\n")
        self.file.flush()


_LOG: LibraryLog | None = None


def verbose_requested() -> bool:
    return os.environ.get("FTCLI_VERBOSE", "") not in ("", "0")


def quiet_libraries(verbose: bool | None = None) -> LibraryLog:
    """Capture library chatter (load reports, warnings, their own progress bars) instead of
    printing it: ftcli prints what matters itself. Idempotent; returns the capture."""
    global _LOG
    verbose = verbose_requested() if verbose is None else verbose
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if verbose else "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if _LOG is None:
        _LOG = LibraryLog()
        root = logging.getLogger()
        root.addHandler(_LOG)
        if root.level > logging.WARNING or root.level == logging.NOTSET:
            root.setLevel(logging.WARNING)
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> captured
        warnings.simplefilter("default")  # each warning once per place, as Python shows them
    _LOG.verbose = verbose
    for name in _LIBRARIES:
        own = name in _OWN_HANDLERS and not verbose
        logging.getLogger(name).setLevel(logging.ERROR if own else logging.WARNING)
    return _LOG


def keep_library_log(path) -> None:
    """Keep the captured library output in a run folder's file from now on."""
    quiet_libraries().keep_in(path)


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class UI:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self.enabled = is_main_process()
        stream = sys.stderr if json_mode else sys.stdout
        # logs and pipes get 100 columns rather than rich's 80, so lines do not wrap mid-figure
        width = None if stream.isatty() else max(100, int(os.environ.get("COLUMNS", "0") or 0))
        self.console = Console(file=stream, highlight=False, width=width)

    def info(self, message: str = "") -> None:
        if (
            self.enabled
        ):  # a line of text is never broken: terminals wrap it, and logs stay greppable
            self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        """One line on stderr, whatever the mode: a warning must not be lost in a JSON pipe."""
        if self.enabled:
            sys.stderr.write(f"warning: {message}\n")

    def step(self, title: str) -> None:
        if self.enabled:
            self.console.print(f"[bold cyan]▸ {title}[/]")

    def table(
        self, title: str, rows: list[tuple], headers: tuple = ("", ""), whole: tuple[int, ...] = ()
    ) -> None:
        """A table; the columns in ``whole`` (paths a user copies) are never cut short."""
        if not self.enabled:
            return
        t = Table(title=title, title_justify="left", show_header=any(headers))
        for i, h in enumerate(headers):
            if i in whole:
                width = max([len(str(h)), *(len(str(r[i])) for r in rows)])
                t.add_column(str(h), no_wrap=True, min_width=width)
            else:
                t.add_column(str(h))
        for r in rows:
            t.add_row(*[str(x) for x in r])
        self.console.print(t)

    @contextlib.contextmanager
    def status(self, message: str):
        """A status line for a pause (loading a model): a spinner in a terminal, one line elsewhere."""
        if not self.enabled:
            yield
        elif self.console.is_terminal:
            with self.console.status(message):
                yield
        else:
            self.console.print(message, soft_wrap=True)
            yield

    @contextlib.contextmanager
    def counter(self, what: str, total: int, every: float = 10.0):
        """Count through a long phase: a bar in a terminal; elsewhere a line at the start, then one
        at most every ``every`` seconds and one at the end. Yields ``advance(n)``."""
        if not self.enabled:
            yield lambda n=1: None
            return
        if self.console.is_terminal:
            bar = Progress(
                TextColumn(f"[bold]{what}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            task = bar.add_task(what, total=total)
            with bar:
                yield lambda n=1: bar.advance(task, n)
            return
        state = {"done": 0, "last": time.monotonic()}
        self.console.print(f"{what}: 0/{total:,}", soft_wrap=True)

        def advance(n: int = 1) -> None:
            state["done"] += n
            now = time.monotonic()
            if now - state["last"] >= every and state["done"] < total:
                state["last"] = now
                self.console.print(f"{what}: {state['done']:,}/{total:,}", soft_wrap=True)

        yield advance
        self.console.print(f"{what}: {state['done']:,}/{total:,} done", soft_wrap=True)

    def progress(self) -> TrainProgress | None:
        return TrainProgress(self.console) if self.enabled else None


class TrainProgress:
    """A rich progress bar with loss, learning rate and tokens/s; plain lines when not a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "tps": "-"}
        self.total = 0
        self.last_line = time.monotonic()

    def start(self, total: int, done: int = 0) -> None:
        self.total = total
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, **self.fields)
        if not self.console.is_terminal:
            self.console.print(
                f"train: {total} optimizer steps" + (f", from {done}" if done else "")
            )
            self.last_line = time.monotonic()

    def update(
        self,
        step: int,
        loss: float | None = None,
        lr: float | None = None,
        tps: float | None = None,
    ) -> None:
        if loss is not None:
            self.fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tps": f"{tps:,.0f}"}
            if not self.console.is_terminal:
                self.console.print(
                    f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
                )
                self.last_line = time.monotonic()
        elif not self.console.is_terminal and time.monotonic() - self.last_line >= 10:
            # between log steps, a count every 10 s or so: a slow run is not a silent one
            self.console.print(f"step {step}/{self.total}")
            self.last_line = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **self.fields)

    def note(self, message: str) -> None:
        self.console.print(message)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
