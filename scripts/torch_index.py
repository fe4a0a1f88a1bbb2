"""Which PyTorch CUDA build the NVIDIA driver here can run, for scripts/setup.sh.

Prints the wheel index URL (exit 0), or why none fits and which driver is needed (exit 2).
The driver's supported CUDA version comes from ``nvidia-smi``'s header ("CUDA Version: X.Y"),
else from its driver version. Runs on the system Python: standard library only.

The builds and the Linux drivers they need (NVIDIA's CUDA release notes; a driver runs every
CUDA build up to the version its header reports):
    cu130  CUDA 13.0  driver >= 580.65.06
    cu128  CUDA 12.8  driver >= 570.26
    cu126  CUDA 12.6  driver >= 560.28.03
FTCLI_TORCH_INDEX=cu128 (or a full URL) overrides the choice.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

INDEX = "https://download.pytorch.org/whl/"
# (CUDA version of the build, index name, the oldest Linux driver that runs it), newest first
BUILDS = [
    ((13, 0), "cu130", "580.65.06"),
    ((12, 8), "cu128", "570.26"),
    ((12, 6), "cu126", "560.28.03"),
]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def index_for(cuda: tuple[int, ...]) -> tuple[str | None, str]:
    """(index name or None, a one-line explanation) for a driver supporting CUDA ``cuda``."""
    for build, name, driver in BUILDS:
        if cuda >= build:
            shown = ".".join(map(str, cuda[:2]))
            return (
                name,
                f"driver supports CUDA {shown}: torch's {name} build (needs driver >= {driver})",
            )
    oldest = BUILDS[-1]
    return None, (
        f"the driver supports CUDA {'.'.join(map(str, cuda[:2]))}, older than torch's oldest CUDA "
        f"build here ({oldest[1]}, CUDA {oldest[0][0]}.{oldest[0][1]}): update the NVIDIA driver to "
        f">= {oldest[2]} (>= {BUILDS[0][2]} for {BUILDS[0][1]})"
    )


def cuda_of_driver(driver: str) -> tuple[int, ...] | None:
    """The newest CUDA of BUILDS a driver version runs (when the header names none)."""
    for build, _, need in BUILDS:
        if _version(driver) >= _version(need):
            return build
    return (0, 0)


def driver_cuda(smi: str = "nvidia-smi") -> tuple[int, ...] | None:
    """The CUDA version the driver supports, from ``nvidia-smi``; None when it does not answer."""
    exe = shutil.which(smi)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out.stdout)
    if out.returncode == 0 and found:
        return int(found.group(1)), int(found.group(2))
    try:
        q = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in q.stdout.splitlines() if ln.strip()]
    if q.returncode != 0 or not lines:
        return None
    return cuda_of_driver(lines[0])


def main() -> int:
    forced = os.environ.get("FTCLI_TORCH_INDEX")
    if forced:
        print(forced if "://" in forced else INDEX + forced)
        print(f"FTCLI_TORCH_INDEX={forced}: as given", file=sys.stderr)
        return 0
    cuda = driver_cuda()
    if cuda is None:
        print("nvidia-smi does not answer: no usable NVIDIA driver", file=sys.stderr)
        return 2
    name, why = index_for(cuda)
    print(why, file=sys.stderr)
    if name is None:
        return 2
    print(INDEX + name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
