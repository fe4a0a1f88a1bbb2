"""A real small filesystem for the full-disk tests: a tmpfs of a few hundred KiB mounted for the
test (root only; the test is skipped, saying why, where mounting is not permitted), and a
ballast file that leaves it exactly as full as a test needs."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "400k") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``where`` for the block; skip the test where one cannot be
    mounted (not root, no mount binary, a container without the capability)."""
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount"):
        pytest.skip("no mount command: a small real filesystem cannot be made here")
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        why = r.stderr.strip() or f"exit {r.returncode}"
        pytest.skip(f"cannot mount a {size} tmpfs to fill ({why}); these tests need root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        if os.path.ismount(where):  # something still open there: detach it anyway
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill ``fs`` with a ballast file, then give back ``leave`` bytes (rounded to pages)."""
    ballast = Path(fs) / "ballast"
    block = b"\0" * 4096
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    size = ballast.stat().st_size
    os.truncate(ballast, max(0, size - leave))
    return ballast


def free(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bfree * st.f_frsize
