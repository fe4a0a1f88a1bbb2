"""The files ftcli ships inside its package: recipes, architecture cards, benchmark tasks.

Every reader finds them here, through ``importlib.resources``, so a wheel install sees the same
files as a source checkout or an editable install (a path computed from ``__file__`` outside the
package exists only in a checkout: docs/traps.md#a-wheel-holds-only-what-it-declares). They must be
declared as package data in pyproject.toml; a test builds the wheel and checks every file is in it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ftcli.errors import FtcliError


def _root() -> Path:
    """This package's folder on disk (recipes ``extends:`` siblings and lm-eval reads task files
    by path, so a zipped install, which has no real folder, is refused in one message)."""
    root = resources.files(__name__)
    if not isinstance(root, Path):
        raise FtcliError(
            f"ftcli's bundled files are inside an archive ({root}); they must be files on disk",
            hint="install ftcli with pip (not as a zip) so its recipes and cards can be read",
        )
    return root


def recipes_dir() -> Path:
    """The bundled recipes' folder."""
    return _root() / "recipes"


def recipe_names() -> list[str]:
    """The bundled recipes by name (``quickstart``, ...), sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name: str) -> Path | None:
    """The bundled recipe a name means: ``quickstart``, ``quickstart.yaml`` or
    ``recipes/quickstart.yaml`` (the form ``ftcli recipes`` lists); None when there is none."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    if rel.parts[:1] == ("recipes",):
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    if not rel.parts:
        return None
    for candidate in (recipes_dir() / rel, recipes_dir() / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def cards_dir() -> Path:
    """The bundled architecture cards' folder (one config.json-like file per model)."""
    return _root() / "cards"


def benchmarks_dir() -> Path:
    """The bundled lm-eval tasks' folder (task YAMLs with their local data files)."""
    return _root() / "benchmarks"
