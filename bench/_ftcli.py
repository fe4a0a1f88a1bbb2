"""What the bench scripts share: ftcli run as a user runs it, in a fresh process, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ftcli(*args: str) -> dict:
    """``python -m ftcli ARGS --json`` from this checkout; its JSON, or exit with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "ftcli", *args, "--json"], env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        sys.exit(f"ftcli {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)
