"""Small helpers shared by the stages: atomic writes, JSON lines, versions."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ftcli.errors import FtcliError

_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as torch.save and safetensors report it (a RuntimeError with text)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError | OSError) and (
        "No space left on device" in text or "Disk quota exceeded" in text
    )


def disk_full_error(target: Path) -> FtcliError:
    return FtcliError(
        f"the disk is full: {target} was not written (nothing half-written is left; what was "
        "there before is kept)",
        hint=f"free space where {Path(target).parent} lives (df -h {Path(target).parent}), then "
        "rerun; a training run continues with --resume",
    )


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
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
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
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise


def read_jsonl(path: Path, partial_tail: bool = False) -> list[dict]:
    """Rows of a JSON-lines file. ``partial_tail``: a last line with no newline (an append cut
    short by a full disk or a kill) is dropped, not an error (metrics.jsonl on resume)."""
    path = Path(path)
    if not path.exists():
        return []
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085... inside JSON strings
    lines = path.read_text(encoding="utf-8").split("\n")
    if partial_tail and lines:
        lines = lines[:-1]  # "" after a final newline, or the cut-short line
    return [json.loads(x) for x in lines if x.strip()]


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
        try:
            yield tmp
        except BaseException as exc:
            if is_disk_full(exc):
                raise disk_full_error(target) from None
            raise
        follow_umask(tmp)
        _fsync_tree(tmp)
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


def remove_leftovers(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files and folders (``.NAME.tmp-*``, ``.NAME.*.tmp``, ``.NAME.old-*``)
    that atomic writes of a process that died left in ``folder`` and its subfolders; never under
    the top-level entries named in ``skip`` (another process may be writing there: a tune study)."""
    gone = []
    folder = Path(folder)
    for pattern in (".*.tmp-*", ".*.tmp", ".*.old-*"):
        for p in folder.rglob(pattern):
            if p.relative_to(folder).parts[0] in skip:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk before it is renamed into place: after a power cut the
    rename never points at files the kernel had not written yet."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of each file in ``folder`` matching ``pattern`` (names relative to it)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def check_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    """Raise a user error naming the first file of ``folder`` whose sha256 is not as recorded."""
    for name, digest in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise FtcliError(
                f"{what} {folder} is damaged: {name} is missing",
                hint="it was deleted or never fully written: rerun the step that wrote it",
            )
        if sha256_file(path) != digest:
            raise FtcliError(
                f"{what} {folder} is damaged: {path} does not match the sha256 recorded when it "
                "was written (truncated or altered)",
                hint="delete the folder and rerun the step that wrote it (a training run: "
                "ftcli train <recipe> --resume continues from the checkpoint before it)",
            )


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
