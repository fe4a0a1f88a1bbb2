"""scripts/torch_index.py: the torch CUDA build setup.sh installs for the driver nvidia-smi
reports (a fake nvidia-smi on PATH stands in for the driver)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torch_index.py"
HEADER = (
    "+-----------------------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |\n"
)


def run(tmp_path: Path, smi: str | None, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        exe = bin_dir / "nvidia-smi"
        exe.write_text(smi)
        exe.chmod(0o755)
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        timeout=60,
    )


def header(driver: str, cuda: str) -> str:
    return "#!/bin/sh\ncat <<'X'\n" + HEADER.format(driver=driver, cuda=cuda) + "X\n"


@pytest.mark.parametrize(
    ("driver", "cuda", "index"),
    [
        ("580.95.05", "13.0", "cu130"),
        ("590.10", "13.1", "cu130"),
        ("575.57.08", "12.9", "cu128"),
        ("570.124.06", "12.8", "cu128"),
        ("560.35.03", "12.6", "cu126"),
    ],
)
def test_the_header_picks_the_build(tmp_path, driver, cuda, index):
    out = run(tmp_path, header(driver, cuda))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"https://download.pytorch.org/whl/{index}"
    assert f"CUDA {cuda}" in out.stderr


def test_an_old_driver_names_the_driver_needed(tmp_path):
    out = run(tmp_path, header("535.183.01", "12.2"))
    assert out.returncode == 2 and out.stdout == ""
    assert "update the NVIDIA driver to >= 560.28.03" in out.stderr


def test_without_the_header_the_driver_version_decides(tmp_path):
    smi = (
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=driver_version) echo 572.16 ;; *) echo "no header" ;; esac\n'
    )
    out = run(tmp_path, smi)
    assert out.stdout.strip() == "https://download.pytorch.org/whl/cu128", out.stderr


def test_no_driver_answering(tmp_path):
    assert run(tmp_path, None).returncode == 2
    failing = run(tmp_path, "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert failing.returncode == 2 and "does not answer" in failing.stderr


def test_the_override_wins(tmp_path):
    out = run(tmp_path, header("535.1", "12.2"), FTCLI_TORCH_INDEX="cu126")
    assert out.stdout.strip() == "https://download.pytorch.org/whl/cu126"
