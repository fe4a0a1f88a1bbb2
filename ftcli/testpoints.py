"""Test-only pause points: deterministic places for the crash tests to kill or interrupt a run.

``FTCLI_TEST_PAUSE=point[,point]`` with ``FTCLI_TEST_PAUSE_FILE=<path>``, read once at import,
makes the process stop at each named point the first time it reaches it: it writes the point's
name to the file and waits until the test removes the file (or kills the process). Points:
``step:<k>`` (after step k's metrics row), ``checkpoint`` (inside a checkpoint write, its temporary
folder created), ``validation`` (after the first validation batch), ``merge`` (before the merge).
Unset, ``PAUSE`` is empty and each point costs one ``if PAUSE:``. Not for users.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_FILE = os.environ.get("FTCLI_TEST_PAUSE_FILE", "")
PAUSE: set[str] = (
    {p for p in os.environ.get("FTCLI_TEST_PAUSE", "").split(",") if p} if _FILE else set()
)


def pause(point: str) -> None:
    """Test-only: at ``point`` (if named, once), write the marker file and wait until it is gone."""
    if point not in PAUSE:
        return
    PAUSE.discard(point)
    marker = Path(_FILE)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(point)
    tmp.replace(marker)  # the test never reads a half-written name
    while marker.exists():
        time.sleep(0.01)  # a SIGINT lands here as KeyboardInterrupt, as it would mid-work
