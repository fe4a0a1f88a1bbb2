"""Loading a recipe: YAML files with their ``extends:`` chain, ``--set`` overrides, relative paths
anchored, then validation into a Recipe that reports every problem at once.

``load_recipe(path, overrides)`` reads YAML with ``yaml.safe_load`` semantics, applies ``--set
key=value`` overrides to the raw mapping, then validates (``recipe_from_mapping``). Each problem
names the file, the line, the dotted key and, where it can, the nearest valid key or value.

The top of the recipe package: it imports the other modules and none imports it. Validation runs
here because checking a tune.space value means validating the recipe it makes (``_space_problems``):
keeping that recursion in one module keeps checks.py free of any call back into loading.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ftcli.errors import FtcliError, Problem, RecipeError
from ftcli.recipe.applies import METHOD_KEYS, _inapplicable
from ftcli.recipe.checks import _semantic_problems, _space_entries, _space_problem, _tune_problems
from ftcli.recipe.origin import RecipeOrigin, _check_size, _node_lines
from ftcli.recipe.schema import CHAT_TEMPLATES, DataSpec, Recipe
from ftcli.recipe.suggest import _problem_from_error


class _HugeInt(yaml.constructor.ConstructorError):
    """Valid YAML whose integer Python will not read: reported without "not valid YAML"."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose integers past Python's int-string limit (4300 digits) are a YAML
    error at their line, instead of the ValueError that ``int()`` raises from inside PyYAML."""

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            raise _HugeInt(
                None,
                None,
                f"an integer of {digits} digits (more than Python reads, and more than any recipe "
                "value needs)",
                node.start_mark,
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _is_float_string(value: Any) -> bool:
    return isinstance(value, str) and bool(
        re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value)
    )


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; users mean a number."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    return float(node) if _is_float_string(node) else node


def recipe_from_mapping(
    data: Any, file: str = "<recipe>", lines=None, overridden=None, files=None
) -> Recipe:
    """Validate a mapping (already YAML-parsed) into a Recipe, or raise RecipeError listing every
    problem. ``files``: keys that came from another file (an ``extends:`` parent) -> that file."""
    origin = RecipeOrigin(file, lines or {}, overridden or set(), files)
    if not isinstance(data, dict):
        raise RecipeError(
            [Problem("a recipe is a mapping of keys (name:, task:, model: ...)", file=file, line=1)]
        )
    try:
        recipe = Recipe.model_validate(_fix_yaml_floats(data))
    except ValidationError as exc:
        problems = [_problem_from_error(e, origin) for e in exc.errors()]
        raise RecipeError(_dedupe(problems)) from None
    recipe._origin = origin
    problems = _semantic_problems(recipe) + _space_problems(recipe) + _tune_problems(recipe)
    errors, recipe._warnings = _inapplicable(recipe, {p.key for p in problems})
    problems += errors
    if problems:
        raise RecipeError(problems)
    return recipe


def _space_problems(r: Recipe) -> list[Problem]:
    """A space that could produce an invalid recipe is reported now, before any trial runs: every
    choice and both bounds go through the same override path as ``--set``, then the whole
    validation (a trial recipe has no tune section, so this recursion stops at once)."""
    if r.tune is None:
        return []
    base = yaml.safe_load(r.to_yaml())
    base.pop("tune", None)
    p = []
    for key, entry in _space_entries(r):
        if isinstance(entry, Problem):  # its shape is wrong: nothing to try
            p.append(entry)
            continue
        for value in entry:
            data = yaml.safe_load(yaml.safe_dump(base))
            apply_overrides(data, [(tuple(key.split(".")), value)])
            try:
                recipe_from_mapping(data, file="<trial>")
            except RecipeError as exc:
                inner = exc.problems[0]
                where = f"{inner.key}: " if inner.key and inner.key != key else ""
                p.append(
                    _space_problem(
                        r,
                        key,
                        f"the value {value!r} makes an invalid recipe: {where}{inner.message}",
                        inner.hint,
                    )
                )
                break
    return p


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p.render() not in seen:
            seen.add(p.render())
            out.append(p)
    return out


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``train.optimizer.lr=1e-4`` -> (("train", "optimizer", "lr"), "1e-4" or a parsed YAML value)."""
    if "=" not in text:
        raise FtcliError(
            f"--set {text!r}: expected KEY=VALUE",
            hint="for example --set train.optimizer.lr=1.0e-4",
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*", key):
        raise FtcliError(
            f"--set {text!r}: {key!r} is not a dotted key", hint="for example method.r=16"
        )
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except _HugeInt as exc:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise FtcliError(
            f"--set {shown}: {exc.problem}", hint="check the value; no recipe key takes it"
        ) from None
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def apply_overrides(data: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> list[Problem]:
    problems = []
    for path, value in overrides:
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section",
                        key=".".join(path),
                        file="--set",
                    )
                )
                break
            node = child
        else:
            if value is None:  # --set key=null: back to the default (or gone)
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return problems


# --------------------------------------------------------------------------- reading files


def _read_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int], list[Problem]]:
    """One file's mapping, the line of each key, and its duplicate-key problems."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:  # PermissionError, IsADirectoryError, a vanished file...
        raise RecipeError(
            [
                Problem(
                    f"cannot read the recipe: {exc.strerror or exc}",
                    file=file,
                    hint="check the path and its permissions",
                )
            ]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            [
                Problem(
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                    file=file,
                    line=line,
                    hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                )
            ]
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_size(node, file)
        data = _safe_load(text)
    except _HugeInt as exc:
        raise RecipeError(
            [
                Problem(
                    exc.problem,
                    file=file,
                    line=exc.problem_mark.line + 1,
                    hint="write the number you mean; no recipe key takes one this long",
                )
            ]
        ) from None
    except RecursionError:
        raise RecipeError(
            [Problem("not valid YAML: nested too deeply", file=file, hint="flatten it")]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            [Problem(f"not valid YAML: {reason}", file=file, line=mark.line + 1 if mark else None)]
        ) from None
    lines: dict[tuple[str, ...], int] = {}
    problems: list[Problem] = []
    if node is not None:
        _node_lines(node, (), lines, problems, file)
    return ({} if data is None else data), lines, problems


def _deep_merge(base: dict, over: dict, where: dict, own: dict, prefix: tuple = ()) -> dict:
    """``over`` on top of ``base``: mappings merge, lists and scalars replace, None removes.
    ``where`` (dotted key -> (file, line)) is updated to say where each surviving value came from."""
    out = dict(base)
    for key, value in over.items():
        path = (*prefix, str(key))
        if value is None:
            out.pop(key, None)
            for k in [k for k in where if k[: len(path)] == path]:
                del where[k]
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            where[path] = own[path]
            out[key] = _deep_merge(out[key], value, where, own, path)
            continue
        for k in [k for k in where if k[: len(path)] == path]:
            del where[k]
        for k, loc in own.items():
            if k[: len(path)] == path:
                where[k] = loc
        out[key] = value
    return out


def _find_parent(name: Any, child: Path) -> Path | None:
    if not isinstance(name, str) or not name.strip():
        return None
    near = child.parent / name
    if near.is_file():
        return near
    bundled = resolve_recipe_path(name)
    return bundled if bundled.is_file() else None


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict | Any, dict, list]:
    """A recipe with its ``extends:`` chain resolved: (flat mapping, key -> (file, line), problems)."""
    data, lines, problems = _read_yaml(path)
    file = str(path)
    own = {k: (file, line) for k, line in lines.items()}
    if not isinstance(data, dict) or "extends" not in data:
        return data, own, problems
    parent_name = data.pop("extends")
    at = lines.get(("extends",))
    parent = _find_parent(parent_name, path)
    if parent is None:
        raise RecipeError(
            [
                *problems,
                Problem(
                    f"cannot find the recipe {parent_name!r} (a path relative to this recipe, or a "
                    "bundled recipe's name)",
                    key="extends",
                    file=file,
                    line=at,
                    hint="`ftcli recipes` lists the bundled ones",
                ),
            ]
        )
    seen = (*chain, path.resolve())
    if parent.resolve() in seen:
        names = " -> ".join(str(p) for p in (*seen, parent.resolve()))
        raise RecipeError(
            [
                *problems,
                Problem(f"extends forms a cycle: {names}", key="extends", file=file, line=at),
            ]
        )
    base, where, parent_problems = _load_layers(parent, seen)
    if not isinstance(base, dict):
        raise RecipeError(
            [Problem(f"{parent} is not a recipe mapping", key="extends", file=file, line=at)]
        )
    own.pop(("extends",), None)
    where = dict(where)
    where[()] = (file, lines.get((), 1))
    return _deep_merge(base, data, where, own), where, parent_problems + problems


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read (with its ``extends:`` chain), override and validate a recipe file. Raises
    FtcliError/RecipeError for the user."""
    path = Path(path)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        path = path / "recipe.yaml"  # a run folder: its resolved recipe
    if path.is_dir():
        raise FtcliError(
            f"{path} is a folder without a recipe.yaml",
            hint="give the recipe's YAML file, or a run folder (it holds recipe.yaml)",
        )
    if not path.is_file():
        names = {p.stem.lower(): p.stem for p in bundled_recipes_dir().glob("*.yaml")}
        close = difflib.get_close_matches(path.stem.lower(), list(names), n=1, cutoff=0.6)
        raise FtcliError(
            f"recipe not found: {path}",
            hint=(f"did you mean {names[close[0]]}? " if close else "")
            + "give a YAML file path; `ftcli recipes` lists the bundled ones",
        )
    file = str(path)
    data, where, problems = _load_layers(path)
    parsed = [parse_override(o) for o in overrides]
    notes: list[str] = []
    if isinstance(data, dict):
        anchored = anchor_paths(data, path.parent)
        problems += apply_overrides(data, parsed)
        for k in {".".join(p) for p, _ in parsed}:
            anchored.pop(k, None)
        anchored.update(anchor_paths(data, Path.cwd(), {p for p, _ in parsed}))
        notes += drop_inapplicable(data, parsed)
        labels_as_strings(data)
    lines = {k: line for k, (_, line) in where.items()}
    files = {k: f for k, (f, _) in where.items() if f != file}
    try:
        recipe = recipe_from_mapping(data, file, lines, {p for p, _ in parsed}, files)
    except RecipeError as exc:
        found = problems + exc.problems
        found.sort(key=lambda q: (q.file == "--set", q.file != file, q.line or 0))
        err = RecipeError(found)
        err.partial = data_part(data, file, lines, {p for p, _ in parsed})
        if err.partial is not None:
            err.partial._anchored = anchored
        raise err from None
    if problems:
        raise RecipeError(problems)
    recipe._notes = notes
    recipe._anchored = anchored if isinstance(data, dict) else {}
    return recipe


# --------------------------------------------------------------------------- what a new user writes

PATH_KEYS = (
    ("data", "path"),
    ("data", "validation_path"),
    ("data", "test_path"),
    ("model", "name"),
    ("data", "chat_template"),  # a Jinja file's path (a template's name is left alone)
)
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "init")


def anchor_paths(
    data: dict, base: Path, only: set[tuple[str, ...]] | None = None
) -> dict[str, tuple[str, str]]:
    """Make the recipe's relative local paths absolute, from ``base`` (the recipe's folder for keys in
    the file, the working directory for ``--set`` ones), so a run repeats from anywhere. A hub id or
    a ``pkg:`` spec is left alone: a relative value is a path when it exists under ``base`` or looks
    like one (``./x``, ``x.csv``, a glob)."""
    from ftcli.sources import PKG, looks_local

    done = {}
    keys = list(PATH_KEYS)
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("sources"), list):  # a mixture's paths
        keys += [("data", "sources", str(i), "path") for i in range(len(d["sources"]))]
    for key in keys:
        if only is not None and not any(key[: len(o)] == o for o in only):
            continue
        section = data
        for part in key[:-1]:
            if isinstance(section, list) and part.isdigit() and int(part) < len(section):
                section = section[int(part)]
            elif isinstance(section, dict):
                section = section.get(part)
            else:
                section = None
        value = section.get(key[-1]) if isinstance(section, dict) else None
        if not isinstance(value, str) or not value or value.startswith(PKG):
            continue
        if key == ("data", "chat_template") and value in ("model", *CHAT_TEMPLATES):
            continue
        if value.startswith("~") or Path(value).is_absolute():
            continue
        here = base.absolute() / value
        if here.exists() or glob.glob(str(here)) or looks_local(value):
            section[key[-1]] = os.path.normpath(here)
            done[".".join(key)] = (value, str(base.absolute()))
    return done


def drop_inapplicable(data: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> list[str]:
    """``--set method.kind=X``: drop the file's method keys that kind X does not read (METHOD_KEYS,
    the table APPLIES defers to for them; quantization outside qlora), with one note listing
    them. Keys given with ``--set`` stay, so an explicit inapplicable value is still an error."""
    kind = next((v for p, v in reversed(overrides) if p == ("method", "kind")), None)
    method = data.get("method")
    if not isinstance(kind, str) or not isinstance(method, dict):
        return []
    gone = [k for k, kinds in METHOD_KEYS.items() if kind not in kinds]
    if kind != "qlora":
        gone.append("quantization")
    explicit = {p[1] for p, _ in overrides if len(p) > 1 and p[0] == "method"}
    dropped = [k for k in gone if k in method and k not in explicit]
    for k in dropped:
        method.pop(k)
    if not dropped:
        return []
    return [
        f"--set method.kind={kind}: dropped "
        + ", ".join(f"method.{k}" for k in dropped)
        + f" (no meaning for {kind})"
    ]


def data_part(data: Any, file: str, lines, overridden) -> Recipe | None:
    """The task and data sections alone, when they are valid although the rest is not: enough for
    ``validate`` to check the data in the same report (a method typo must not hide a bad column)."""
    if not isinstance(data, dict):
        return None
    try:
        d = DataSpec.model_validate(_fix_yaml_floats(data.get("data")))
        task = Recipe.model_fields["task"].annotation
        if data.get("task") not in typing.get_args(task):
            return None
    except ValidationError:
        return None
    part = Recipe.model_construct(task=data["task"], data=d)
    part._origin = RecipeOrigin(file, lines or {}, overridden or set())
    return part


def labels_as_strings(data: dict) -> None:
    """``labels: [0, 1, 2]``: YAML reads numbers, the data's labels are read as text ("0", "1")."""
    d = data.get("data")
    labels = d.get("labels") if isinstance(d, dict) else None
    if isinstance(labels, list):
        d["labels"] = [
            str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in labels
        ]


def bundled_recipes_dir() -> Path:
    """The bundled recipes' folder, inside the package (ftcli/bundled/recipes/)."""
    from ftcli.bundled import recipes_dir

    return recipes_dir()


def resolve_recipe_path(name: str) -> Path:
    """A path as given, or the name of a bundled recipe (``quickstart`` -> recipes/quickstart.yaml)."""
    from ftcli.bundled import recipe_path

    p = Path(name)
    if p.exists():
        return p
    return recipe_path(name) or p
