"""The docs cannot drift from the code: the generated recipe reference names every schema key, and
every anchor of docs/traps.md that code or docs cite is a heading there. (The site itself is built
with ``mkdocs build --strict`` in .ci/run, which also checks the links between its pages.)"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import unicodedata
from pathlib import Path

from pydantic import BaseModel

from ftcli.recipe import APPLIES, Recipe

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _reference_page() -> str:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render()


def _sections(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _sections(arg)]


def _schema_keys(cls: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        for sub in _sections(field.annotation):
            keys += _schema_keys(sub, f"{dotted}.")
    return keys


def test_the_reference_names_every_schema_key_with_its_rule():
    page = _reference_page()
    keys = _schema_keys()
    assert {"name", "data.augment.paraphrase.model", "train.optimizer.lr"} <= set(keys)
    table = [line for line in page.splitlines() if line.startswith("| `")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table}
    missing = [k for k in keys if k not in rows]
    assert not missing, f"keys missing from the generated reference: {missing}"
    assert "(not in APPLIES)" not in page
    for key, rule in APPLIES.items():
        if rule is not None and key in rows:
            assert rule.where in rows[key], key


def _slug(heading: str) -> str:
    """Python-Markdown's default heading id (what MkDocs links to)."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore")
    text = re.sub(r"[^\w\s-]", "", text.decode("ascii")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _trap_anchors() -> set[str]:
    anchors = set()
    for line in (DOCS / "traps.md").read_text().splitlines():
        m = re.match(r"#{2,6} (.+?)(?:\s*\{#([\w-]+)\})?\s*$", line)
        if m:
            anchors.add(m.group(2) or _slug(m.group(1)))
    return anchors


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.sh", "*.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


def test_every_cited_trap_anchor_exists():
    anchors = _trap_anchors()
    assert {"cpu-qlora-repacking", "packing-needs-a-mask", "fsdp-on-a-cpu-host"} <= anchors
    cited = {
        (f.relative_to(ROOT).as_posix(), a)
        for f in _tracked_text_files()
        for a in re.findall(r"docs/traps\.md#([\w-]+)", f.read_text(errors="replace"))
    }
    assert cited, "no code cites docs/traps.md"
    broken = sorted((f, a) for f, a in cited if a not in anchors)
    assert not broken, f"anchors not in docs/traps.md: {broken}"


def test_readme_and_docs_point_inside_the_repository():
    """The user guide never sends readers to files outside the repository."""
    names = ("../" + "shared", "TRA" + "PS.md", "DES" + "IGN.md")  # split: git grep finds none
    pattern = re.compile("|".join(re.escape(n) for n in names))
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]
    found = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
