"""The hub probe with the network on: every other test runs offline (HF_HUB_OFFLINE=1), so these
point HF_ENDPOINT at a local socket that stays silent or refuses and check that `ftcli train` on
an uncached hub id still fails in seconds with the fix, not after the download's ~47 s timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """A listening socket on 127.0.0.1 that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as srv:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"


@contextmanager
def refusing_endpoint() -> Iterator[str]:
    """A port on 127.0.0.1 that nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def train_online(tmp_path: Path, tiny_data, endpoint: str) -> tuple[int, str, float, float]:
    """`ftcli train` on an uncached hub id, offline mode off, the hub at ``endpoint``: (exit code,
    output, seconds in all, seconds from its first output line, once torch and co. are imported)."""
    m = tiny_recipe(tmp_path, {"bert": "unused"}, tiny_data)
    m["model"] = {"name": "some-org/not-cached-model"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftcli", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    lines, first = [], None
    timer = threading.Timer(120, proc.kill)  # the old probe let this hang for minutes
    timer.start()
    try:
        for line in proc.stdout:
            first = first or time.perf_counter()
            lines.append(line)
        code = proc.wait()
    finally:
        timer.cancel()
    end = time.perf_counter()
    return code, "".join(lines), end - t0, end - (first or t0)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [(silent_endpoint, "did not answer within 3 s"), (refusing_endpoint, "cannot reach 127.0.0.1")],
    ids=["silent", "refusing"],
)
def test_unreachable_hub_fails_fast_with_a_fix(tmp_path, tiny_data, endpoint, why):
    with endpoint() as url:
        code, out, seconds, after_start = train_online(tmp_path, tiny_data, url)
    assert code == 1, (code, out)
    assert "Traceback" not in out, out
    assert "error: model 'some-org/not-cached-model' is not a local path, is not cached" in out
    assert "the hub is out of reach" in out and why in out, out
    assert "hint: point it at a local folder" in out, out
    # a correctness bound, not a benchmark: well under the download's own ~47 s timeout. Counted
    # from the first output line, because importing torch on a loaded 2-core runner alone can take
    # over 10 s; the hub is first asked for after that line (the memory estimate).
    assert after_start < 20, (after_start, seconds, out)
    assert seconds < 60, (seconds, out)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run folder written


def test_probe_reads_the_endpoint_and_waits_for_an_answer(monkeypatch):
    from huggingface_hub import constants

    from ftcli.sources import _hub_reachable

    with silent_endpoint() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        t0 = time.perf_counter()
        reason = _hub_reachable(timeout=0.5)
        assert reason and "did not answer within 0.5 s" in reason and url[7:] in reason
        assert time.perf_counter() - t0 < 5
    with socket.create_server(("127.0.0.1", 0)) as srv:
        # an endpoint that answers (any HTTP status) is reachable
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")

        def answer():
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert _hub_reachable(timeout=5) is None
        t.join(5)
