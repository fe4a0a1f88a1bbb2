"""One run per run folder: a lock file holding the pid and host of the ``ftcli train`` using it,
and the check that the output folder can be written at all, both before anything is loaded.

The lock lives beside the run folder (``<output_dir>/.<name>.lock``), not in it: a fresh start
replaces the run folder, and the lock must survive that. A lock whose process is gone (kill -9,
a crash, a reboot) is stale: the next run takes it over and says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ftcli.errors import FtcliError
from ftcli.util import disk_full_error, is_disk_full


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
    """A lock this process holds; ``took_over`` describes the stale lock it replaced, if any.
    ``fd`` keeps the lock file open: the kernel lock on it lasts as long as it stays open."""

    path: Path
    took_over: str | None
    fd: int | None = field(default=None, compare=False, repr=False)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _refuse(run_dir: Path, path: Path, other: dict) -> FtcliError:
    pid, their_host = other.get("pid", "?"), other.get("host", "?")
    return FtcliError(
        f"{run_dir} is in use by another ftcli train (pid {pid} on {their_host}, since "
        f"{other.get('since', '?')})",
        hint=f"wait for it to finish; if that process is gone, delete {path}",
    )


def _same_file(fd: int, path: Path) -> bool:
    """The open lock file is still the one at ``path`` (not one its holder deleted on release)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


_OPEN: set[int] = set()  # lock files this process holds open


def _close_in_child() -> None:
    """A forked child (a data loader worker) shares the parent's kernel lock: closing its copy
    of the descriptor (never unlocking, which would free the parent's too) keeps a child that
    outlives a killed parent from holding the run folder."""
    for fd in _OPEN:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)

_WAIT_S = 5.0  # how long a newcomer waits for a lock being taken over to name its new holder


def acquire(run_dir: Path) -> Held:
    """Take the run folder's lock, or raise naming the process that holds it.

    The lock is a kernel lock (flock) on the lock file, held while the file stays open, so of
    several processes that find a stale lock at once exactly one takes it over; the pid and
    host written in it name the holder for the others' messages. A lock file naming a live
    process (or one on another host, which cannot be checked) refuses even without a kernel
    lock on it.
    """
    path = lock_path(run_dir)
    host = socket.gethostname()
    me = {
        "pid": os.getpid(),
        "host": host,
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    deadline = time.monotonic() + _WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process holds it
            os.close(fd)
            other = _read(path)
            if (not other or process_gone(other.get("pid"), other.get("host"))) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.01)  # its holder is writing its name in it this instant
                continue
            raise _refuse(run_dir, path, other) from None
        if not _same_file(fd, path):  # locked a file its holder deleted on release: again
            os.close(fd)
            continue
        try:
            held = Held(path, _take(fd, path, run_dir, me), fd)
        except BaseException:
            os.close(fd)
            raise
        _OPEN.add(fd)
        return held


def _take(fd: int, path: Path, run_dir: Path, me: dict) -> str | None:
    """With the kernel lock held: check who the file names, then write this process in it.
    Returns the stale holder it replaces, if any."""
    with open(os.dup(fd), "rb") as f:
        raw = f.read()
    try:
        other = json.loads(raw) if raw.strip() else {}
    except ValueError:
        other = {}
    took_over = None
    if other.get("pid") is not None or other.get("host") is not None:
        pid, their_host = other.get("pid"), other.get("host")
        if not process_gone(pid, their_host):
            raise _refuse(run_dir, path, other)
        took_over = f"pid {pid} on {their_host}, since {other.get('since', '?')}"
    elif raw.strip():
        took_over = f"a damaged lock file ({len(raw)} bytes)"
    data = json.dumps(me).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise
    return took_over


def holder_gone(run_dir: Path) -> bool:
    """True when the run folder's lock names a process on this machine that no longer runs (the
    run was killed); False when there is no lock, or its holder lives or is on another host."""
    other = _read(lock_path(run_dir))
    return process_gone(other.get("pid"), other.get("host"))


def release(held: Held) -> None:
    """Delete the lock file if it still names this process, then drop the kernel lock."""
    try:
        if _read(held.path).get("pid") == os.getpid() and (
            held.fd is None or _same_file(held.fd, held.path)
        ):
            with contextlib.suppress(FileNotFoundError):
                held.path.unlink()
    finally:
        if held.fd is not None and held.fd in _OPEN:
            _OPEN.discard(held.fd)
            with contextlib.suppress(OSError):
                os.close(held.fd)


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
