"""Did you mean: the key or value a misspelt one most likely meant (names from other tools
included), and pydantic's validation errors turned into located, one-line problems for the user."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel

from ftcli.errors import Problem
from ftcli.recipe.origin import RecipeOrigin
from ftcli.recipe.schema import Recipe

# Names people bring from other tools, mapped to ours (the key, relative to the same section).
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "warmup": "warmup_ratio",
    "model_name": "name",
    "base_model": "name",
    "method": "kind",
    "type": "kind",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "max_len": "max_length",
}


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model inside an annotation (``X``, ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_model(arg)
        if found is not None:
            return found
    return None


def _section_at(path: tuple[str, ...]) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = Recipe
    for part in path:
        if cls is None or part not in cls.model_fields:
            return None
        cls = section_model(cls.model_fields[part].annotation)
    return cls


def _all_keys(cls: type[BaseModel] = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    cls = cls or Recipe
    keys = []
    for name, field in cls.model_fields.items():
        keys.append((*prefix, name))
        sub = section_model(field.annotation)
        if sub is not None:
            keys.extend(_all_keys(sub, (*prefix, name)))
    return keys


def suggest_key(path: tuple[str, ...]) -> str | None:
    """The valid dotted key a misspelt or misplaced ``path`` most likely meant."""
    if not path:
        return None
    parent, leaf = path[:-1], path[-1]
    section = _section_at(parent)
    if section is not None:
        names = list(section.model_fields)
        alias = ALIASES.get(leaf.lower())
        if alias in names:
            return ".".join((*parent, alias))
        close = difflib.get_close_matches(leaf.lower(), names, n=1, cutoff=0.6)
        if close:
            return ".".join((*parent, close[0]))
    # A real key in another section (train.lr -> train.optimizer.lr)?
    wanted = {leaf, ALIASES.get(leaf.lower(), leaf)}
    elsewhere = [k for k in _all_keys() if k[-1] in wanted]
    if elsewhere:
        elsewhere.sort(key=lambda k: (0 if k[: len(parent)] == parent else 1, len(k)))
        return ".".join(elsewhere[0])
    return None


def _literal_choices(path: tuple[str, ...]) -> list[str]:
    if path and path[-1].isdigit():  # an item of a list of choices (train.report_to.0)
        path = path[:-1]
    section = _section_at(path[:-1])
    if section is None or path[-1] not in section.model_fields:
        return []
    choices: list[str] = []

    def walk(t: Any) -> None:
        if typing.get_origin(t) is Literal:
            choices.extend(str(a) for a in typing.get_args(t))
        for a in typing.get_args(t):
            walk(a)

    walk(section.model_fields[path[-1]].annotation)
    return choices


def _problem_from_error(err: dict, origin: RecipeOrigin) -> Problem:
    raw = tuple(str(p) for p in err["loc"])
    # pydantic adds the member type to loc for unions (e.g. 'list[str]'): keep only real keys
    loc = tuple(
        p for p in raw if not re.search(r"[\[\]'(]", p) and p not in {"str", "int", "float", "bool"}
    )
    if err["type"] == "extra_forbidden" and raw and loc[-1:] != raw[-1:]:
        loc = (*loc, raw[-1])  # the unknown key itself, whatever characters it holds ("(")
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        suggestion = suggest_key(loc)
        hint = f"did you mean {suggestion}?" if suggestion else None
        return origin.problem(key, "unknown key", hint)
    if kind == "missing":
        choices = _literal_choices(loc)
        hint = f"one of: {', '.join(choices)}" if choices else None
        return origin.problem(key, "required key is missing", hint)
    if kind in {"literal_error", "enum"}:
        choices = _literal_choices(loc)
        got = err.get("input")
        return origin.problem(
            key, f"{got!r} is not one of: {', '.join(choices)}", _did_you_mean(got, choices)
        )
    if kind == "model_type" and _section_at(loc) is not None:
        return _section_given_a_value(loc, err.get("input"), origin)
    hint = None
    if kind == "finite_number":
        hint = "write a finite number (.inf and .nan are YAML's infinity and not-a-number)"
    elif kind == "less_than_equal":
        hint = f"{err.get('ctx', {}).get('le')} is beyond any real run: is there an extra digit?"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = err.get("input")
    if not isinstance(got, dict | list) and got is not None:
        shown = repr(got)
        message = f"{message} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return origin.problem(key, message[0].lower() + message[1:], hint)


def _did_you_mean(got: Any, choices: list[str]) -> str | None:
    """The choice ``got`` most likely meant, compared case-insensitively (``LoRA`` -> ``lora``)."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(got).lower(), list(lower), n=1, cutoff=0.5)
    return f"did you mean {lower[close[0]]!r}?" if close else None


def _section_given_a_value(loc: tuple[str, ...], got: Any, origin: RecipeOrigin) -> Problem:
    """``--set method=lora``: a section set to a plain value; point at the key that takes it."""
    section = _section_at(loc)
    key = ".".join(loc)
    fields = list(section.model_fields)
    target = next(
        (f for f in fields if str(got).lower() in map(str.lower, _literal_choices((*loc, f)))),
        None,
    )
    hint = (
        f"did you mean {key}.{target}={got}?"
        if target
        else f"set one of its keys, e.g. {key}.{fields[0]}"
    )
    return origin.problem(key, f"is a section ({', '.join(fields[:4])}, ...), not a value", hint)
