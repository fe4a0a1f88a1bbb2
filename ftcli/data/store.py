"""The data cache: prepared and tokenized data kept once per content, under
``cache_dir()/data/<key>/``, reused by every run, ``tune`` trial and ``cv`` fold that asks for it.

The key is a sha256 over what the data stage reads: each source file's content (xxh3-128, with a
small index so an unchanged file is not read again), a hub dataset's revision, the recipe's
``data`` section (paths replaced by their contents, so a moved file still hits) and task, the
tokenizer's files and the format version. An entry is built in a temporary folder beside it and
renamed into place complete, its manifest (each file's size; a sha256 of the small ones) written
last; a hit checks the manifest before opening it. A damaged entry is removed and rebuilt. One
process per key builds (a kernel lock); in a multi-process run only each node's local main
process looks up or builds, and the others open what it names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ftcli.errors import DataError, FtcliError, SourceError
from ftcli.sources import cache_dir, hub_offline, resolve_data
from ftcli.util import (
    DiskFull,
    atomic_dir,
    atomic_write_text,
    disk_full_error,
    is_disk_full,
    sha256_file,
)

# Bump when what an entry holds, or what prepare/tokenize put in it, changes meaning.
FORMAT_VERSION = 1
MANIFEST = "ftcli-manifest.json"
MARKER = ".ftcli-data-entry"  # written first: the folder is ftcli's even if its manifest is lost
DATA = "data"  # write_data's folder inside an entry
INDEX = ".hash-index.json"
LAST = ".last"
SMALL = 1 << 20  # files up to this size get a sha256 in the manifest (a hit re-checks them)
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# data keys that change how training batches, not what the data stage writes
NOT_IN_KEY = ("packing", "num_proc")
# a file changed within this long of being hashed may change again inside the same mtime tick:
# its index entry is not trusted (it is hashed again next time)
RACY_NS = 2_000_000_000
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_GLOBS = ("*.model", "*.tiktoken", "additional_chat_templates/*", "*.py")


def data_cache_dir() -> Path:
    """Where the entries live: ``cache_dir()/data`` ($FTCLI_CACHE relocates it)."""
    return cache_dir() / "data"


def short(key: str) -> str:
    return key[:12]


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _digest(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


# --------------------------------------------------------------------------- content hashes


def xxh_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in 4 MiB blocks (about 10x faster than sha256)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class HashIndex:
    """(path, size, mtime_ns, inode, device) -> content hash, kept in the cache folder, so an
    unchanged file is not read again on every run; any change of those reads it again."""

    def __init__(self, root: Path):
        self.path = Path(root) / INDEX
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def hash(self, path: Path) -> str:
        name = os.path.abspath(path)
        st = os.stat(name)
        ident = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        known = self.entries.get(name)
        if isinstance(known, dict) and known.get("id") == ident and known.get("settled"):
            return known["xxh"]
        digest = xxh_file(Path(name))
        after = os.stat(name)
        settled = [after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev] == ident and (
            time.time_ns() - st.st_mtime_ns > RACY_NS
        )
        self.entries[name] = {"id": ident, "xxh": digest, "settled": settled}
        self.dirty = True
        return digest

    def save(self) -> None:
        """Write the index (files that are gone dropped); it only saves time, so a failure to
        write it is not an error."""
        if not self.dirty:
            return
        kept = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        with contextlib.suppress(OSError, FtcliError):
            atomic_write_text(self.path, json.dumps(kept) + "\n")
        self.dirty = False


# --------------------------------------------------------------------------- the key


def _resolve(recipe, spec: str):
    try:
        return resolve_data(spec)
    except SourceError:
        from ftcli.data.examples import source_of  # the located message for a recipe key

        return source_of(recipe, spec)


def _suffix(path: str) -> str:
    """The name's format-bearing suffixes (``.csv.gz``): the reader picks the format by them."""
    return "".join(Path(path).suffixes[-2:]).lower()


def hub_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The hub dataset's revision without the network where it is cached (the hub cache's ref,
    else datasets' own cache folders); asked of the hub only when online. None if unknown."""
    from huggingface_hub import constants

    ref = (
        Path(constants.HF_HUB_CACHE)
        / f"datasets--{repo_id.replace('/', '--')}"
        / "refs"
        / (revision or "main")
    )
    with contextlib.suppress(OSError):
        return "hub:" + ref.read_text().strip()
    root = Path(
        os.environ.get("HF_DATASETS_CACHE")
        or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "datasets"
    )
    found = sorted(
        str(p.relative_to(root))
        for d in root.glob(repo_id.replace("/", "___") + "*")
        for p in [d, *d.glob("*/*/*")]
        if p.is_dir()
    )
    if found:
        return "datasets-cache:" + _digest(found)
    if hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        return "hub:" + HfApi().dataset_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # the hub's errors are many; an unknown revision only means no reuse
        return None


def source_part(recipe, spec: str, index: HashIndex) -> dict:
    """What a data source is, by content: files' hashes (with their format suffix), a folder's
    files by relative path, or a hub dataset's id and revision."""
    src = _resolve(recipe, spec)
    if src.kind == "hub":
        return {"hub": src.hub_id, "revision": hub_revision(src.hub_id)}
    if src.kind == "folder":
        folder = Path(src.paths[0])
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {"folder": [[p.relative_to(folder).as_posix(), index.hash(p)] for p in files]}
    return {"files": [[_suffix(p), index.hash(Path(p))] for p in src.paths]}


def tokenizer_folder(tokenizer_dir, revision: str | None = None) -> Path | None:
    """The local folder holding the tokenizer's files: the folder itself, or a hub id's cached
    snapshot."""
    path = Path(str(tokenizer_dir)).expanduser()
    if path.is_dir():
        return path
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        for name in ("tokenizer_config.json", "tokenizer.json"):
            found = try_to_load_from_cache(str(tokenizer_dir), name, revision=revision)
            if isinstance(found, str):
                return Path(found).parent
    return None


def tokenizer_files(folder: Path, index: HashIndex) -> dict[str, str]:
    """{relative path: content hash} of the tokenizer's files in ``folder``."""
    paths = {folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    for pattern in TOKENIZER_GLOBS:
        paths |= {p for p in folder.glob(pattern) if p.is_file()}
    return {p.relative_to(folder).as_posix(): index.hash(p) for p in sorted(paths)}


def tokenizer_part(tokenizer, tokenizer_dir, index: HashIndex, revision: str | None = None):
    """The tokenizer's files' hashes, and what ftcli changed on the loaded one (pad token,
    padding side) with its chat template; its full serialization where no files are found."""
    folder = tokenizer_folder(tokenizer_dir, revision)
    files = tokenizer_files(folder, index) if folder is not None else {}
    loaded = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": getattr(tokenizer, "eos_token", None),
        "pad": getattr(tokenizer, "pad_token", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
    }
    added = getattr(tokenizer, "ftcli_added_tokens", None)
    if added:  # model.add_tokens: which tokens, and which are special (the size alone cannot tell)
        loaded["added_tokens"] = added
    if not files:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        loaded["serialized"] = (
            hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None
        )
    return {"files": files, "loaded": loaded}


def _libraries() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("ftcli", "transformers", "tokenizers", "datasets", "pyarrow"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _format() -> dict:
    from ftcli.data import prepared

    return {"store": FORMAT_VERSION, "prepared": getattr(prepared, "FORMAT_VERSION", None)}


# the parts a key is made of, in the order a miss names them, with how a change reads
PART_WORDS = {
    "format": "format version changed",
    "libraries": "library versions changed",
    "task": "recipe task changed",
    "data": "recipe data section changed",
    "tokenizer": "tokenizer changed",
}
SOURCES = ("path", "validation_path", "test_path")


def task_part(recipe) -> str:
    """The task as the key reads it: preference data trained by KTO prepares and tokenizes
    otherwise (unpaired rows kept, pairs split in two), so it is a task of its own here."""
    from ftcli.data.pairs import wants_kto

    return "preference:kto" if wants_kto(recipe) else recipe.task


def key_parts(
    recipe,
    tokenizer,
    tokenizer_dir,
    index: HashIndex,
    unreusable: list | None = None,
    base: tuple[dict, dict] | None = None,
) -> dict[str, str]:
    """Each part of the key as a digest: format, libraries, task, data (the section without its
    paths), tokenizer, and one ``source data.<key>`` per source. A hub dataset whose revision
    cannot be told gets a key never seen again (said in ``unreusable``). ``base``:
    ``_base_parts`` already worked out (the sources read once for the key and the light key)."""
    parts, section = base if base is not None else _base_parts(recipe, index, unreusable)
    parts, section = dict(parts), dict(section)
    if recipe.data.max_length == "auto":  # what else the chosen length depends on (lengths.py)
        from ftcli.data.lengths import model_position_limit

        section["auto_length_bounds"] = [
            model_position_limit(recipe, tokenizer),
            recipe.train.batch_tokens,
        ]
    parts["data"] = _digest(section)
    parts["tokenizer"] = _digest(
        tokenizer_part(tokenizer, tokenizer_dir, index, getattr(recipe.model, "revision", None))
    )
    return parts


def _base_parts(recipe, index: HashIndex, unreusable: list | None) -> tuple[dict, dict]:
    """The key's parts that need no tokenizer (format, libraries, task, sources) and the data
    section as the key reads it (sources replaced by their content)."""
    d = recipe.data
    section = d.model_dump(mode="json")
    for k in NOT_IN_KEY:
        section.pop(k, None)
    parts = {
        "format": _digest(_format()),
        "libraries": _digest(_libraries()),
        "task": _digest(task_part(recipe)),
    }
    specs = [(f"data.{k}", getattr(d, k), section, k) for k in SOURCES]
    if d.sources:  # a mixture: each source by content, under the name its examples carry
        from ftcli.recipe.schema import source_names

        for i, (s, name) in enumerate(zip(d.sources, source_names(d.sources), strict=True)):
            entry = section["sources"][i]
            entry["name"] = name
            specs.append((f"data.sources.{i}.path", s.path, entry, "path"))
    for key, spec, holder, k in specs:
        if spec:
            holder[k] = "<source>"  # by content below: a moved file still hits
            part = source_part(recipe, spec, index)
            if part.get("hub") and part.get("revision") is None:
                part["unknown"] = uuid.uuid4().hex  # a revision nobody can tell: never reused
                if unreusable is not None:
                    unreusable.append(f"the revision of hub dataset {spec!r} cannot be told")
            parts[f"source {key}"] = _digest(part)
    return parts, section


def _model_folder(model) -> Path | None:
    """The local folder a recipe's tokenizer loads from, told without loading anything; None
    where telling takes more (an earlier run folder is verified, a GGUF file not yet converted
    is converted, a hub model outside the local cache is looked up)."""
    from ftcli.sources import PKG, gguf_folder, is_run_folder, resolve_model

    spec = model.name
    path = Path(os.path.expanduser(spec))
    if is_run_folder(path):
        return None  # models.run_folder_start checks its weights' hashes
    if not spec.startswith(PKG) and not path.exists():
        return tokenizer_folder(spec, model.revision)  # the hub cache's snapshot, if any
    try:
        source = resolve_model(spec, model.revision)
    except FtcliError:
        return None
    folder = gguf_folder(source) if source.kind == "gguf" else Path(source.path)
    return folder if (folder / "config.json").is_file() else None


def light_key(recipe, index: HashIndex, base: tuple[dict, dict] | None = None) -> str | None:
    """A digest of everything the key is made of, read without loading the tokenizer: the
    tokenizer-free parts, the recipe's model section and batch budget, and the model folder's
    tokenizer files and config.json (what the loaded tokenizer and the position limit are
    made from, with the library versions). Equal light keys mean equal keys; None where the
    folder cannot be told cheaply or a source can never be reused (``base``: ``_base_parts``
    already worked out, of a source that can be)."""
    folder = _model_folder(recipe.model)
    if folder is None:
        return None
    if base is None:
        never: list[str] = []
        base = _base_parts(recipe, index, never)
        if never:
            return None
    parts, section = base
    return _digest(
        {
            **parts,
            "data": section,
            "model": recipe.model.model_dump(mode="json"),
            "batch_tokens": recipe.train.batch_tokens,
            "tokenizer files": tokenizer_files(folder, index),
            "config": index.hash(folder / "config.json"),
        }
    )


def key_of(parts: dict[str, str]) -> str:
    return _digest(parts)


# --------------------------------------------------------------------------- why a miss


def _last_path(root: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "_"
    return root / LAST / f"{safe}.json"


def miss_reason(root: Path, name: str, key: str, parts: dict[str, str]) -> str:
    """One line on why ``key`` has no entry: what changed since this recipe name's last key."""
    try:
        last = json.loads(_last_path(root, name).read_text(encoding="utf-8"))
        before = last["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no entry for key {short(key)}"
    if last.get("key") == key:
        return f"no entry for key {short(key)} (removed since its last use)"
    changed = [
        f"source {k[len('source ') :]} changed"
        for k in parts
        if k.startswith("source ") and before.get(k) != parts[k]
    ]
    changed += [words for k, words in PART_WORDS.items() if before.get(k) != parts.get(k)]
    return ", ".join(changed) if changed else f"no entry for key {short(key)}"


def _remember(root: Path, name: str, key: str, parts: dict, light: str | None) -> None:
    record = {"key": key, "parts": parts, "light": light}
    with contextlib.suppress(OSError, FtcliError):
        atomic_write_text(_last_path(root, name), json.dumps(record) + "\n")


# --------------------------------------------------------------------------- entries


def _manifest(entry: Path, key: str, source: str) -> dict:
    files = {}
    for p in sorted(entry.rglob("*")):
        if not p.is_file() or p.name in (MANIFEST, MARKER):
            continue
        size = p.stat().st_size
        info: dict = {"size": size}
        if size <= SMALL:
            info["sha256"] = sha256_file(p)
        files[p.relative_to(entry).as_posix()] = info
    return {
        "ftcli": "data-cache",
        "format": FORMAT_VERSION,
        "key": key,
        "source": source,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }


def read_manifest(entry: Path) -> dict | None:
    try:
        m = json.loads((Path(entry) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def damage(entry: Path) -> str | None:
    """None when the entry is whole by its manifest (sizes; the small files' sha256), else what
    is wrong, in a few words."""
    entry = Path(entry)
    if not (entry / MANIFEST).is_file():
        return "its manifest is missing"
    m = read_manifest(entry)
    if m is None:
        return "its manifest is damaged"
    for rel, info in m["files"].items():
        p = entry / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != info.get("size"):
            return f"{rel} is {size:,} bytes, its manifest says {info.get('size'):,}"
        if "sha256" in info and sha256_file(p) != info["sha256"]:
            return f"{rel} does not match its recorded sha256"
    return None


def is_ours(entry: Path) -> bool:
    """A folder ftcli's cache made: a key's name and ftcli's marker (or manifest) inside."""
    entry = Path(entry)
    return (
        entry.is_dir()
        and bool(KEY_RE.match(entry.name))
        and ((entry / MARKER).is_file() or read_manifest(entry) is not None)
    )


def _open(entry: Path):
    from ftcli.data.prepared import read_data

    return read_data(entry / DATA)


def _openable(entry: Path):
    """(prepared, tokenized) of a whole entry, or the reason it cannot be used."""
    why = damage(entry)
    if why is not None:
        return None, why
    try:
        return _open(entry), None
    except (FtcliError, OSError, ValueError) as exc:  # pyarrow's errors are OSError/ValueError
        text = exc.message if isinstance(exc, FtcliError) else f"{type(exc).__name__}: {exc}"
        return None, f"it cannot be read ({text.splitlines()[0] if text else ''})"


def _cache_disk_full(target: Path, exc: DiskFull) -> DiskFull:
    return DiskFull(
        exc.path,
        f"the disk is full: the data cache entry {target} was not written ({exc.path} did not "
        "fit; nothing half-written is left)",
        hint=f"free space where {target.parent} lives (df -h {target.parent}), run `ftcli cache "
        "--clear` to drop old entries, or set FTCLI_CACHE to a folder on a bigger disk",
    )


def _build(recipe, tokenizer, root: Path, key: str, ui) -> Path:
    """write_data into a temporary folder beside the entry, the manifest last, then renamed in."""
    from ftcli.data.prepared import write_data

    target = root / key
    try:
        with atomic_dir(target) as tmp:
            (tmp / MARKER).write_text("ftcli data cache entry\n")
            (tmp / DATA).mkdir()
            write_data(recipe, tokenizer, tmp / DATA, ui)
            manifest = _manifest(tmp, key, recipe.data.where)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except DiskFull as exc:
        raise _cache_disk_full(target, exc) from None
    except OSError as exc:
        if is_disk_full(exc, root):
            raise _cache_disk_full(target, disk_full_error(target)) from None
        raise
    return target


@contextlib.contextmanager
def key_lock(root: Path, key: str, ui=None) -> Iterator[None]:
    """One builder per key: a kernel lock (flock) on ``.<key>.lock``; a second process waits
    for it, then finds the entry the first one built."""
    path = root / f".{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if is_disk_full(exc, root):
            raise _cache_disk_full(root / key, disk_full_error(path)) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if ui is not None:
                ui.info(f"  waiting: another process is preparing data {short(key)}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure(recipe, tokenizer, tokenizer_dir, ui=None):
    """Look up or build the recipe's entry (this process only); returns (entry, prepared,
    tokenized, note) with note "cached KEY" or "prepared KEY: why"."""
    root = data_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc, root):
            raise _cache_disk_full(root, disk_full_error(root)) from None
        raise
    index = HashIndex(root)
    never: list[str] = []
    try:
        base = _base_parts(recipe, index, never)
        parts = key_parts(recipe, tokenizer, tokenizer_dir, index, base=base)
        light = None if never else light_key(recipe, index, base)
    finally:
        index.save()
    key = key_of(parts)
    with key_lock(root, key, ui):
        entry = root / key
        why = None
        if entry.exists():
            opened, damaged = _openable(entry)
            if opened is not None:
                _remember(root, recipe.name, key, parts, light)
                return entry, *opened, f"cached {short(key)}"
            shutil.rmtree(entry, ignore_errors=True)  # ftcli's own folder, under its key
            why = f"entry {short(key)} was damaged ({damaged}): removed, prepared again"
        else:
            why = miss_reason(root, recipe.name, key, parts)
            if never:
                why += f"; not reusable: {never[0]}"
        _build(recipe, tokenizer, root, key, ui)
        prepared, tokenized = _open(entry)
    _remember(root, recipe.name, key, parts, light)
    return entry, prepared, tokenized, f"prepared {short(key)}: {why}"


@contextlib.contextmanager
def reading_ahead(recipe) -> Iterator[None]:
    """``examples.read_ahead`` into the data cache's folder: a big source is read by the worker
    processes while this process loads the tokenizer (a cache miss only: call it after
    ``load_cached``). Without a usable cache folder, nothing starts early: ``ensure`` says why."""
    from ftcli.data.examples import read_ahead

    root = data_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = None
    with read_ahead(recipe, root) if root is not None else contextlib.nullcontext():
        yield


def load_cached(recipe, ui=None):
    """(PreparedData, {split: Tokenized}, "cached KEY") when this recipe's last entry is still
    what it asks for, told by its light key without loading the tokenizer (the seconds of a
    cached ``ftcli prepare`` went to importing and loading it); None otherwise: then
    ``load_data``, which loads the tokenizer and says why it missed."""
    root = data_cache_dir()
    if recipe.data.streaming or not root.is_dir():
        return None
    try:
        last = json.loads(_last_path(root, recipe.name).read_text(encoding="utf-8"))
        key, known = last["key"], last["light"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(key, str) and KEY_RE.match(key) and isinstance(known, str)):
        return None
    index = HashIndex(root)
    try:
        light = light_key(recipe, index)
    finally:
        index.save()
    if light != known:
        return None
    with key_lock(root, key, ui):  # not while another process builds or removes it
        if not (root / key).is_dir():
            return None
        opened, _ = _openable(root / key)
    if opened is None:
        return None
    prepared, tokenized = opened
    return _with_source(recipe, prepared), tokenized, f"cached {short(key)}"


def _with_source(recipe, prepared):
    """The entry may have been built from the same content at another path: name this run's."""
    stats = dict(prepared.stats or {})
    if "source" in stats:
        stats["source"] = recipe.data.where
    if isinstance(stats.get("sources"), dict) and recipe.data.sources:
        from ftcli.recipe.schema import source_names

        paths = dict(zip(source_names(recipe.data.sources), recipe.data.sources, strict=True))
        stats["sources"] = {
            name: {**info, "path": paths[name].path} if name in paths else info
            for name, info in stats["sources"].items()
        }
    return replace(prepared, stats=stats)


def _gather(obj, world: int) -> list:
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def load_data(recipe, tokenizer, tokenizer_dir, acc=None, ui=None):
    """(PreparedData, {split: Tokenized}, note) for the recipe, through the cache.

    In a multi-process run only each node's local main process looks up or builds the entry;
    every process then learns the entry (or the error) from it in one collective, and the others
    open the same files: they never prepare or tokenize. Ranks are taken to be numbered
    contiguously per node (torchrun and accelerate do), so a node's main is its rank minus its
    local index.
    """
    if recipe.data.streaming:  # read as it trains, nothing to cache (every rank scans alike)
        from ftcli.data.stream import load_streamed

        return load_streamed(recipe, tokenizer, ui)
    world = getattr(acc, "num_processes", 1) if acc is not None else 1
    if world <= 1:
        _, prepared, tokenized, note = ensure(recipe, tokenizer, tokenizer_dir, ui)
        return _with_source(recipe, prepared), tokenized, note
    failed: BaseException | None = None
    mine = None
    if acc.is_local_main_process:
        try:
            entry, prepared, tokenized, note = ensure(recipe, tokenizer, tokenizer_dir, ui)
            mine = ("ok", str(entry), note)
        except FtcliError as exc:
            failed, mine = exc, ("error", exc.message, exc.hint)
        except BaseException as exc:
            failed = exc
            mine = ("error", f"preparing the data failed: {type(exc).__name__}: {exc}", None)
    told = _gather(mine, world)[acc.process_index - acc.local_process_index]
    if failed is not None:
        raise failed
    if told is None or told[0] == "error":
        raise FtcliError(told[1] if told else "the node's main process prepared no data", told[2])
    if not acc.is_local_main_process:
        entry = Path(told[1])
        why = damage(entry)
        if why is not None:
            raise DataError(f"the data cache entry {entry} the main process prepared: {why}")
        prepared, tokenized = _open(entry)
        note = told[2]
    return _with_source(recipe, prepared), tokenized, note


# --------------------------------------------------------------------------- listing and clearing


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _lock_free(root: Path, key: str) -> bool:
    """No process holds the key's lock now (none is building it)."""
    path = root / f".{key}.lock"
    if not path.exists():
        return True
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def list_entries(root: Path | None = None) -> tuple[list[dict], list[str]]:
    """(ftcli's entries: key, source, size, created, damaged; names of other things there)."""
    root = Path(root or data_cache_dir())
    entries, others = [], []
    if not root.is_dir():
        return entries, others
    for p in sorted(root.iterdir()):
        if p.name in (INDEX, LAST) or (p.name.startswith(".") and p.name.endswith(".lock")):
            continue
        if p.name.startswith(".") and ".tmp-" in p.name and KEY_RE.match(p.name[1:65]):
            continue  # a build under way (or one a killed process left): --clear takes it
        if is_ours(p):
            m = read_manifest(p) or {}
            entries.append(
                {
                    "key": p.name,
                    "source": m.get("source", "?"),
                    "size": folder_size(p),
                    "created": m.get("created", "?"),
                    "damaged": None if m else "its manifest is missing or damaged",
                    "path": str(p),
                }
            )
        else:
            others.append(p.name)
    return entries, others


def clear(root: Path | None = None) -> tuple[int, int, list[str]]:
    """Delete ftcli's entries (and its index, records and leftovers) under the data cache;
    returns (entries removed, bytes freed, names left alone: not ftcli's, or being built)."""
    root = Path(root or data_cache_dir())
    entries, others = list_entries(root)
    removed = freed = 0
    kept = list(others)
    for e in entries:
        if not _lock_free(root, e["key"]):
            kept.append(f"{e['key']} (in use)")
            continue
        shutil.rmtree(e["path"], ignore_errors=True)
        removed += 1
        freed += e["size"]
    if not root.is_dir():
        return removed, freed, kept
    for p in sorted(root.iterdir()):
        key = p.name[1:65]
        if p.name.startswith(".") and ".tmp-" in p.name and KEY_RE.match(key):
            if _lock_free(root, key):
                freed += folder_size(p) if p.is_dir() else 0
                shutil.rmtree(p, ignore_errors=True)
        elif (
            p.name.startswith(".")
            and p.name.endswith(".lock")
            and KEY_RE.match(key)
            and _lock_free(root, key)
        ):
            p.unlink(missing_ok=True)
    (root / INDEX).unlink(missing_ok=True)
    shutil.rmtree(root / LAST, ignore_errors=True)
    return removed, freed, kept
