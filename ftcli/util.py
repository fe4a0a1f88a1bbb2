"""Small helpers shared by the stages: atomic writes, JSON lines, versions."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ftcli.errors import FtcliError

_FULL = {errno.ENOSPC, errno.EDQUOT}
# How a full disk reads when there is no errno: the C library's text, and Rust's io::Error
# (safetensors' SafetensorError, tokenizers' bare Exception) ending "(os error 28)".
_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    f"(os error {errno.ENOSPC})",
    f"(os error {errno.EDQUOT})",
)
# torch.save's zip writer gives no errno: "unexpected pos N vs M" after a short write, "file
# write failed", or the C++ stream's "basic_ios::clear: iostream error", whichever step noticed.
# Any write error reads so; it counts as a full disk only when the filesystem has no room left.
_WRITE_FAILED = ("unexpected pos", "file write failed", "iostream error")
_NO_ROOM = 1 << 20


class DiskFull(FtcliError):
    """The disk filled while ``path`` was written; nothing of it was kept."""

    def __init__(self, path: Path, message: str, hint: str):
        self.path = Path(path)
        super().__init__(message, hint=hint)


def free_bytes(where: Path) -> int | None:
    """Bytes this process can still write on the filesystem holding ``where`` (or its nearest
    existing parent); root may also fill the blocks reserved for it. None if it cannot be told."""
    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """True when ``exc`` (or what it was raised from) means the disk is full: ENOSPC/EDQUOT as an
    errno, or as the text safetensors and tokenizers give; torch.save's errors without either only
    when ``where``'s filesystem is out of space. A user error other than ``DiskFull`` never is."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull):
            return True
        if isinstance(e, FtcliError):
            return False
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        text = str(e)
        if any(t in text for t in _FULL_TEXT):
            return True
        if (
            where is not None
            and isinstance(e, RuntimeError)
            and any(t in text for t in _WRITE_FAILED)
        ):
            free = free_bytes(where)
            if free is not None and free < _NO_ROOM:
                return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(target: Path, file: Path | None = None) -> DiskFull:
    """The one message for a full disk: ``file`` is the file that did not fit, when ``target``
    is a folder that was being written (and so was not put in place either)."""
    target = Path(target)
    if file is None or Path(file) == target:
        what = f"{target} was not written"
    else:
        what = f"{file} could not be written, so {target} was not saved"
    return DiskFull(
        file or target,
        f"the disk is full: {what} (nothing half-written is left; what was there before is kept)",
        hint=f"free space where {target.parent} lives (df -h {target.parent}), then rerun; a "
        "training run continues with --resume",
    )


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process's umask: the mode a plain ``open``/``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written.
    The file gets the umask's mode (mkstemp's 0600 would make records unreadable to the group)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


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


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a file created or renamed into it) to disk: without it a power
    cut can undo a rename that had already returned."""
    if os.name == "nt":  # Windows cannot open a folder; its renames are journaled
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # a filesystem that cannot flush folders: nothing more to do
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folders(folder: Path) -> None:
    """Flush the entries of ``folder`` and of every folder under it (the files' names), deepest
    first, so a folder renamed into place after a power cut lists every file it was built with."""
    for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that takes a file name (safetensors'
    save_file, torch.save, a tokenizer's save): flushed and renamed over ``path`` when the block
    ends, removed on any error. A full disk is one message naming ``path``; what was there is
    kept. The file gets the umask's mode."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException as exc:
        full = is_disk_full(exc, tmp or path.parent)  # asked while the partial file still fills it
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if full:
            raise disk_full_error(path) from None
        raise
    fsync_dir(path.parent)


RENAME_EXCHANGE = 2  # linux/fs.h: swap two names in one step
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    """libc's renameat2 (Linux, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (both must exist). False where the OS or the
    filesystem has no such rename (then nothing was done); an OSError for anything else."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def set_aside_name(target: Path) -> Path:
    """Where ``replace_dir`` keeps the old ``target`` while it puts the new one in place without
    an exchange."""
    target = Path(target)
    return target.with_name(f".{target.name}.old-{os.getpid()}")


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` and flush the rename to disk.

    An existing ``target`` is swapped with ``new`` in one step where the OS can (Linux's
    RENAME_EXCHANGE), so ``target`` is never missing, crash or not; the old folder, now under
    ``new``'s temporary name, is deleted after. Elsewhere it takes two renames, and the old
    folder waits under ``set_aside_name`` between them: ``restore_replaced`` puts it back if a
    crash lands there.
    """
    new, target = Path(new), Path(target)
    if target.exists() and exchange(new, target):
        fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # the old folder now
        return
    old = set_aside_name(target)
    try:
        os.rename(target, old)
    except FileNotFoundError:
        old = None
    os.rename(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Put back each folder under ``folder`` that a replace cut short by a crash left set aside
    (``.NAME.old-PID`` with no ``NAME`` beside it): it is the last complete version, not a
    leftover to delete. Returns the folders put back; nothing under the entries in ``skip``."""
    back = []
    for old in sorted(Path(folder).rglob(".*.old-*")):
        if old.relative_to(folder).parts[0] in skip:
            continue
        target = old.with_name(old.name[1:].rsplit(".old-", 1)[0])
        if old.is_dir() and not target.exists():
            os.rename(old, target)
            fsync_dir(target.parent)
            back.append(target)
    return back


def _unwritten(exc: BaseException, tmp: Path, target: Path) -> Path | None:
    """The file of ``target`` the disk filled on while it was built in ``tmp``, or None if
    nothing says. A nested atomic write and an OSError name it; a library that writes by name
    (safetensors, torch.save, a tokenizer) holds it in a local variable of a frame the error
    passed through: the innermost such frame's, preferring a file that exists (half-written)."""
    base = os.path.abspath(tmp) + os.sep

    def inside(value) -> str | None:
        if isinstance(value, str | os.PathLike):
            with contextlib.suppress(TypeError, ValueError):
                full = os.path.abspath(value)
                if full.startswith(base) and not os.path.isdir(full):
                    return full
        return None

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    found = None
    for e in chain:
        found = inside(e.path if isinstance(e, DiskFull) else getattr(e, "filename", None))
        if found:
            break
    for e in chain if not found else ():
        frames, tb = [], e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            named = dict.fromkeys(filter(None, map(inside, frame.f_locals.values())))
            if named:
                found = max(named, key=lambda f: (os.path.isfile(f), _age(f)))
                break
        if found:
            break
    return None if found is None else Path(target) / os.path.relpath(found, base)


def _age(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_ino)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``; put it in place on success.

    On any error (or Ctrl-C) the temporary folder is removed and ``target`` is left as it was.
    An existing ``target`` is replaced only after the new one is complete and flushed to disk,
    in one step where the OS can (``replace_dir``). A full disk is one message naming the file
    that did not fit.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        if is_disk_full(exc, target.parent):
            raise disk_full_error(target) from None
        raise
    with _completing(tmp, target):
        yield tmp


@contextlib.contextmanager
def _completing(tmp: Path, target: Path) -> Iterator[None]:
    """Around the writing of ``tmp``: then flush it and put it at ``target`` in one step. On any
    error ``tmp`` is removed and ``target`` kept; a full disk is one message naming the file."""
    try:
        try:
            yield
            follow_umask(tmp)
            _fsync_tree(tmp)
            _fsync_folders(tmp)
            replace_dir(tmp, target)
        except BaseException as exc:
            if is_disk_full(exc, tmp):
                raise disk_full_error(target, _unwritten(exc, tmp, target)) from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files and folders (``.NAME.tmp-*``, ``.NAME.*.tmp``, ``.NAME.old-*``)
    that atomic writes of a process that died left in ``folder`` and its subfolders; never under
    the top-level entries named in ``skip`` (another process may be writing there: a tune study)."""
    folder = Path(folder)
    restore_replaced(folder, skip)  # a set-aside folder whose replacement never landed is kept
    gone = []
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


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, subfolders included (names relative to it, with
    "/"): what ``check_hashes`` checks for a sharded checkpoint, whose shards sit in subfolders."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def shards_dir(target: Path) -> Path:
    """The temporary folder several processes write ``target``'s files into (every rank's
    shards) before ``seal_dir`` puts it in place; a name ``remove_leftovers`` finds after a crash."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-shards")


def seal_dir(
    tmp: Path, target: Path, record: str, data: dict, write: Callable[[Path], None] | None = None
) -> Path:
    """Finish a folder other processes wrote into ``tmp`` (a sharded checkpoint): ``write(tmp)``
    adds this process's own files (the scheduler's state), then the JSON ``record`` goes beside
    them all (``data`` plus the sha256 of each file, so a truncated shard is named on load, not
    loaded); it is flushed to disk and put at ``target`` (``replace_dir``: an old ``target`` is
    never missing). On any error ``tmp`` is removed and ``target`` kept; a full disk is one
    message naming the file that did not fit."""
    tmp, target = Path(tmp), Path(target)
    with _completing(tmp, target):
        if write is not None:
            write(tmp)
        write_json(tmp / record, {**data, "sha256": tree_hashes(tmp)})
    return target


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
