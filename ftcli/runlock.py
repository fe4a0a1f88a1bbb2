"""One run per run folder: a lock file holding the pid and host of the ``ftcli train`` using it,
and the check that the output folder can be written at all, both before anything is loaded.

The lock lives beside the run folder (``<output_dir>/.<name>.lock``), not in it: a fresh start
replaces the run folder, and the lock must survive that. A lock whose process is gone (kill -9,
a crash, a reboot) is stale: the next run takes it over and says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import FtcliError


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write a file in it; one user error naming it otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".ftcli-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FtcliError(
            f"cannot write the output folder {folder}: {reason}",
            hint="set output_dir to a folder you can write (or --set output_dir=PATH)",
        ) from None


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def process_gone(pid, host) -> bool:
    """True when ``pid`` on ``host`` is this machine's and no longer runs (False if unknown)."""
    return isinstance(pid, int) and host == socket.gethostname() and not _alive(pid)


@dataclass(frozen=True)
class Held:
    """A lock this process holds; ``took_over`` describes the stale lock it replaced, if any."""

    path: Path
    took_over: str | None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def acquire(run_dir: Path) -> Held:
    """Take the run folder's lock, or raise naming the process that holds it."""
    path = lock_path(run_dir)
    host = socket.gethostname()
    me = {
        "pid": os.getpid(),
        "host": host,
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    took_over = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            pid, their_host = other.get("pid"), other.get("host")
            if process_gone(pid, their_host):
                took_over = f"pid {pid} on {host}, since {other.get('since', '?')}"
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not other:  # being written this instant, or damaged: look again
                continue
            raise FtcliError(
                f"{run_dir} is in use by another ftcli train (pid {pid} on {their_host}, since "
                f"{other.get('since', '?')})",
                hint=f"wait for it to finish; if that process is gone, delete {path}",
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return Held(path, took_over)
    raise FtcliError(
        f"cannot take the lock {path}: it keeps changing",
        hint=f"is another ftcli train starting on {run_dir}? if not, delete {path}",
    )


def holder_gone(run_dir: Path) -> bool:
    """True when the run folder's lock names a process on this machine that no longer runs (the
    run was killed); False when there is no lock, or its holder lives or is on another host."""
    other = _read(lock_path(run_dir))
    return process_gone(other.get("pid"), other.get("host"))


def release(held: Held) -> None:
    if _read(held.path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            held.path.unlink()


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[Held | None]:
    """Hold the run folder's lock for the block (only the main process of a run locks)."""
    if not enabled:
        yield None
        return
    held = acquire(run_dir)
    try:
        yield held
    finally:
        release(held)
