#!/usr/bin/env bash
# The wheel works on its own: build it, install it (not editable) into a throwaway venv, and run
# ftcli from there, in a folder outside the checkout, against the files the wheel ships.
#   bash scripts/wheel_check.sh             # uses .venv (or FTCLI_VENV) for the dependencies
# No network: the wheel is built with .venv's setuptools, and the throwaway venv reaches .venv's
# installed dependencies through a .pth line (which does not run .venv's editable-ftcli hook).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${FTCLI_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "wheel_check: $PY not found (run scripts/setup.sh first)" >&2; exit 1; }
TMP="$(mktemp -d "${TMPDIR:-/tmp}/ftcli-wheel.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "build the wheel from the package files alone"
mkdir -p "$TMP/src" "$TMP/dist"
cp pyproject.toml README.md "$TMP/src/"
tar -cf - --exclude=__pycache__ --exclude='*.pyc' ftcli | tar -xf - -C "$TMP/src"
if "$PY" -c "import setuptools" 2>/dev/null; then
  "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -q -w "$TMP/dist" "$TMP/src"
else
  "$PY" -m pip wheel --no-deps -q -w "$TMP/dist" "$TMP/src"
fi
WHEEL="$(ls "$TMP"/dist/ftcli-*.whl)"
echo "$WHEEL"

step "install it into a clean venv (no pip, no dependencies of its own)"
"$PY" -m venv --without-pip "$TMP/venv"
"$PY" -m pip --python "$TMP/venv/bin/python" install -q --no-deps --no-index "$WHEEL"
SITE="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# added after the install, so pip never saw .venv's (editable) ftcli as already installed
echo "$DEPS" > "$SITE/_ftcli_deps.pth"

mkdir -p "$TMP/work"
cd "$TMP/work"
unset PYTHONPATH
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
FT="$TMP/venv/bin/ftcli"
VPY="$TMP/venv/bin/python"

step "ftcli is imported from the wheel's install, not from the checkout"
where="$("$VPY" -c 'import ftcli; print(ftcli.__file__)')"
echo "$where"
case "$where" in
  "$SITE"/*) ;;
  *) echo "wheel_check: ftcli came from $where, not from $SITE" >&2; exit 1 ;;
esac

step "ftcli recipes"
"$FT" recipes
"$FT" recipes --json >"$TMP/recipes.json" 2>"$TMP/recipes.err" || { cat "$TMP/recipes.err" >&2; exit 1; }
listed="$("$VPY" -c 'import json, sys; print(" ".join(sorted(r["file"] for r in json.load(open(sys.argv[1]))["recipes"])))' "$TMP/recipes.json")"
expected="$(cd "$ROOT/ftcli/bundled" && ls recipes/*.yaml | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//')"
if [ -z "$expected" ] || [ "$listed" != "$expected" ]; then
  echo "wheel_check: ftcli recipes listed [$listed], the checkout has [$expected]" >&2
  exit 1
fi
echo "every bundled recipe listed: $listed"

step "ftcli validate quickstart"
"$FT" validate quickstart

step "ftcli validate quickstart-dora (extends: quickstart.yaml beside it)"
"$FT" validate quickstart-dora --no-data

step "ftcli estimate-memory --model llama-3-8b --weights-only"
"$FT" estimate-memory --model llama-3-8b --weights-only

step "ftcli eval --benchmark: the bundled tasks, found and resolved as the CLI does"
# No command lists them without a trained run: this calls the functions `ftcli eval --benchmark`
# uses (bundled_tasks for the names, resolve_tasks for the harness's specs and their data files).
"$VPY" - <<'EOF'
import importlib.util
from pathlib import Path

import ftcli
from ftcli.evaluation.benchmark import bundled_tasks, resolve_tasks

home = Path(ftcli.__file__).resolve().parent

tasks = bundled_tasks()
print("bundled tasks:", ", ".join(tasks))
assert tasks == ["chatterbot_qa", "rt_sentiment"], tasks
if importlib.util.find_spec("lm_eval") is None:
    print("lm_eval is not installed: checked the names only")
else:
    specs, _ = resolve_tasks(tasks, None)
    for spec in specs:
        files = spec["dataset_kwargs"]["data_files"]["test"]
        files = [files] if isinstance(files, str) else files
        assert all(Path(f).is_file() and home in Path(f).resolve().parents for f in files), files
        print(f"{spec['task']}: {', '.join(files)}")
EOF

printf '\nwheel_check: ok (%s)\n' "$(basename "$WHEEL")"
