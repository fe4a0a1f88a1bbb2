"""The recipe reference page, generated from the schema itself (``ftcli.recipe.Recipe``) and its
``APPLIES`` table, so the page cannot drift from what the loader accepts.

MkDocs runs it as a hook (``hooks:`` in mkdocs.yml): ``on_files`` adds ``reference.md`` to the
site at build time; nothing is written into docs/. ``python docs/gen_reference.py`` prints the
page. tests/unit/test_docs.py checks every schema key appears in it.
"""

from __future__ import annotations

import enum
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PAGE = "reference.md"

INTRO = """# Recipe reference

Every key a recipe accepts, generated from the schema the loader validates with
(`ftcli/recipe/`: the pydantic models in schema.py, the `APPLIES` table in applies.py), so this
page lists exactly what `ftcli validate` accepts. A key set where it does nothing is an error ("only applies to
..."), or a warning where the table says so; how recipes are read, layered and overridden is in
[Recipes](recipes.md).

Sections: {sections}.
"""


def _type(annotation) -> str:
    """An annotation as a reader writes it: ``lora | qlora``, ``list of str``, ``int or null``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in parts)
        return f"{text} or null" if len(parts) < len(args) else text
    if origin in (list, tuple, set):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list | tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`" if value else "`[]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _applies(key: str, applies: dict) -> str:
    if key not in applies:
        return "(not in APPLIES)"
    rule = applies[key]
    if rule is None:
        return "always"
    return f"{rule.where} (else a warning)" if rule.warn else rule.where


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, angle brackets shown (not read as HTML)."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _sections(cls: type[BaseModel], prefix: str = ""):
    """(dotted section name, model) for the recipe and every nested section, depth first."""
    from ftcli.recipe.suggest import section_model

    yield prefix, cls
    for name, field in cls.model_fields.items():
        sub = section_model(field.annotation)
        if sub is not None:
            yield from _sections(sub, f"{prefix}.{name}" if prefix else name)


def render() -> str:
    """The whole page, as Markdown."""
    from ftcli.recipe import APPLIES, Recipe

    sections = list(_sections(Recipe))
    names = ", ".join(f"[`{n}`](#{n.replace('.', '')})" for n, _ in sections if n)
    out = [INTRO.format(sections=f"[top level](#top-level), {names}")]
    for name, cls in sections:
        title = f"`{name}`" if name else "Top level"
        anchor = name.replace(".", "") if name else "top-level"
        out.append(f"## {title} {{#{anchor}}}\n")
        doc = (cls.__doc__ or "").strip()
        if doc and name:
            out.append(_cell(doc.split("\n\n")[0]) + "\n")
        out.append("| key | type | default | applies to | what |")
        out.append("|---|---|---|---|---|")
        for key, field in cls.model_fields.items():
            dotted = f"{name}.{key}" if name else key
            out.append(
                f"| `{dotted}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} "
                f"| {_cell(_applies(dotted, APPLIES))} | {_cell(field.description or '')} |"
            )
        out.append("")
    return "\n".join(out)


def on_files(files, config):
    """MkDocs hook: add the generated page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    print(render())
