"""Small helpers shared by the stages: atomic writes, JSON lines, versions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ftcli.errors import FtcliError


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process's umask: the mode a plain ``open``/``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written.
    The file gets the umask's mode (mkstemp's 0600 would make records unreadable to the group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path):
    """A JSON file ftcli (or transformers/peft) wrote; a damaged one is a user error, not a traceback."""

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FtcliError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})",
            hint="the file is damaged: recreate it by rerunning the step that wrote it",
        ) from None


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line (metrics.jsonl grows during training; a line is written whole or not at all)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085... inside JSON strings
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the umask's modes: mkdtemp makes it 0700 and
    safetensors writes its files 0600, which would hide a merged model from the group."""
    dirs, files = umask_mode(0o777), umask_mode(0o666)
    os.chmod(folder, dirs)
    for root, subdirs, names in os.walk(folder):
        for d in subdirs:
            os.chmod(os.path.join(root, d), dirs)
        for n in names:
            os.chmod(os.path.join(root, n), files)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``; rename it into place on success.

    On any error (or Ctrl-C) the temporary folder is removed and ``target`` is left as it was.
    An existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, for run.json."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in (
        "ftcli",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "safetensors",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
