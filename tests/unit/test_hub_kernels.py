"""bitsandbytes' CPU backend asks the hub for a kernel at import on AVX512-BF16 CPUs; with ftcli
imported, that module runs with ``kernels`` unimportable, and ``kernels`` stays importable for
everything else (docs/traps.md#hub-kernels-at-import). The ``noisy`` sitecustomize makes
bitsandbytes take that path on any CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOISY = ROOT / "tests" / "integration" / "noisy"

# a stand-in ``kernels`` package that records each import and each get_kernel call
FAKE = """
import os
with open(os.environ["KERNELS_LOG"], "a") as f:
    f.write("import\\n")

def get_kernel(*a, **k):
    with open(os.environ["KERNELS_LOG"], "a") as f:
        f.write("get_kernel\\n")
    raise RuntimeError("the hub was asked")
"""


def _run(tmp_path: Path, code: str) -> str:
    """The stand-in's log of ``code`` run in a fresh interpreter."""
    (tmp_path / "fake" / "kernels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "fake" / "kernels" / "__init__.py").write_text(FAKE)
    log = tmp_path / "log"
    log.write_text("")
    path = os.pathsep.join([str(tmp_path / "fake"), str(NOISY), str(ROOT)])
    env = {"PYTHONPATH": path, "KERNELS_LOG": str(log), "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return log.read_text()


def test_bitsandbytes_imports_without_asking_for_a_hub_kernel(tmp_path):
    code = """
    import ftcli
    import bitsandbytes.functional as bf
    import bitsandbytes.backends.cpu.ops as ops
    from ftcli._imports import _Loader
    assert isinstance(ops.__spec__.loader, _Loader)
    import kernels  # still importable for everyone else, afterwards
    """
    assert _run(tmp_path, code) == "import\n"


def test_the_guard_is_what_keeps_it_out(tmp_path):
    """Without ftcli the stand-in is asked: the guard above is what keeps it out."""
    assert _run(tmp_path, "import bitsandbytes.functional") == "import\nget_kernel\n"
