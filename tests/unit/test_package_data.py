"""The wheel holds every file of the package: a bundled recipe, card or benchmark task that
pyproject.toml does not declare as package data exists in a checkout and is missing after
`pip install ftcli` (docs/traps.md#a-wheel-holds-only-what-it-declares)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _package_files() -> set[str]:
    """The package's files as the repository has them (git's list; the folder when not a clone)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "ftcli"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / "ftcli").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    return {f for f in out if (ROOT / f).is_file()}


def test_the_wheel_holds_every_package_file(tmp_path):
    pytest.importorskip("setuptools", reason="builds with the environment's setuptools, offline")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "ftcli", src / "ftcli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("ftcli-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    files = _package_files()
    assert {"ftcli/bundled/recipes/quickstart.yaml", "ftcli/bundled/cards/gpt2.json"} <= files
    missing = sorted(files - members)
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"
