"""The run folder's lock: of many processes that find a stale lock at once exactly one takes it
over; a kernel lock outranks what the file says; a forked child does not keep a killed run's
lock."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcli.errors import FtcliError
from ftcli.runlock import acquire, lock_path, process_gone, release

ROOT = Path(__file__).resolve().parents[2]
PROCS, ROUNDS = 8, 100


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _racer(run_dir: str, start, done, released, wins, refusals) -> None:
    for r in range(ROUNDS):
        start.wait()
        try:
            held = acquire(Path(run_dir))
        except FtcliError as exc:
            held = None
            if "is in use by another ftcli train (pid " in str(exc):
                with refusals.get_lock():
                    refusals[r] += 1
        else:
            with wins.get_lock():
                wins[r] += 1
        done.wait()  # every racer has tried while the winner still holds the lock
        if held is not None:
            release(held)
        released.wait()


def test_many_processes_taking_over_a_stale_lock_at_once_leave_exactly_one_holder(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    run_dir.parent.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    start, done, released = (ctx.Barrier(PROCS + 1, timeout=120) for _ in range(3))
    wins, refusals = ctx.Array("i", ROUNDS), ctx.Array("i", ROUNDS)
    racers = [
        ctx.Process(target=_racer, args=(str(run_dir), start, done, released, wins, refusals))
        for _ in range(PROCS)
    ]
    for p in racers:
        p.start()
    host, dead = socket.gethostname(), _dead_pid()
    try:
        for _ in range(ROUNDS):
            if not process_gone(dead, host):  # the pid was reused meanwhile
                dead = _dead_pid()
            stale = {"pid": dead, "host": host, "since": "then"}
            lock_path(run_dir).write_text(json.dumps(stale))
            start.wait()
            done.wait()
            released.wait()
    finally:
        for p in racers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in racers)
    several = {r: n for r, n in enumerate(wins) if n != 1}
    assert not several, f"rounds with other than one holder (round: holders): {several}"
    assert list(refusals) == [PROCS - 1] * ROUNDS  # the others were refused, naming the holder
    assert not lock_path(run_dir).exists()


SLOW = """
import sys, time
from pathlib import Path
import ftcli.runlock as rl
from ftcli.errors import FtcliError

run_dir, saw, go = map(Path, sys.argv[1:4])
real = rl.process_gone


def slow(pid, host):  # judges the lock stale, then is slow to act on it
    gone = real(pid, host)
    if gone and not saw.exists():
        saw.touch()
        t0 = time.monotonic()
        while not go.exists() and time.monotonic() - t0 < 2:
            time.sleep(0.01)
    return gone


rl.process_gone = slow
try:
    rl.acquire(run_dir)
    print("held", flush=True)
except FtcliError as exc:
    print("refused", exc.message, flush=True)
sys.stdin.read()
"""


def test_a_racer_slow_after_judging_a_lock_stale_does_not_take_it_from_the_new_holder(tmp_path):
    """The interleaving the stress test above can only hope to hit, forced: B reads the stale
    lock and stalls; A takes the lock over meanwhile; B goes on. One of them holds it, never
    both (deleting the stale file and creating a new one let B delete A's)."""
    run_dir, saw, go = tmp_path / "x", tmp_path / "saw", tmp_path / "go"
    host = socket.gethostname()
    lock_path(run_dir).write_text(json.dumps({"pid": _dead_pid(), "host": host, "since": "x"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    b = subprocess.Popen(
        [sys.executable, "-c", SLOW, str(run_dir), str(saw), str(go)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        while not saw.exists():
            assert b.poll() is None and time.monotonic() - t0 < 60
            time.sleep(0.01)
        try:
            a = acquire(run_dir)
        except FtcliError as exc:
            a = None
            assert f"(pid {b.pid} on {host}" in exc.message  # refused, naming B
        go.touch()
        said = b.stdout.readline().split()
        holders = ["A"] * (a is not None) + ["B"] * (said[:1] == ["held"])
        assert len(holders) == 1, f"holders: {holders} (B said {' '.join(said)})"
        if a is not None:
            assert said[:3] == [
                "refused",
                str(run_dir),
                "is",
            ] and f"pid {os.getpid()} " in " ".join(said)
            release(a)
    finally:
        b.kill()
        b.wait()


def test_a_held_kernel_lock_refuses_whatever_the_file_says(tmp_path, monkeypatch):
    import ftcli.runlock

    run_dir = tmp_path / "x"
    held = acquire(run_dir)
    try:
        # the text names a process that is gone, yet the lock is held: never two holders
        stale = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "then"}
        lock_path(run_dir).write_text(json.dumps(stale))
        monkeypatch.setattr(ftcli.runlock, "_WAIT_S", 0.2)
        with pytest.raises(FtcliError, match="is in use by another ftcli train"):
            acquire(run_dir)
    finally:
        release(held)  # drops the kernel lock; the file, naming another pid, is left
    again = acquire(run_dir)  # now nothing holds it: the stale text is taken over
    assert again.took_over == f"pid {stale['pid']} on {socket.gethostname()}, since then"
    release(again)
    assert not lock_path(run_dir).exists()


CHILD = """
import os, sys, time
from pathlib import Path
from ftcli.runlock import acquire
acquire(Path(sys.argv[1]))
if os.fork() == 0:  # a worker forked after the lock was taken, outliving its parent
    time.sleep(60)
    os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path, monkeypatch):
    import ftcli.runlock

    run_dir = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert parent.stdout.readline().strip() == "held"
        pid = parent.pid
        os.kill(pid, signal.SIGKILL)  # kill -9 the run; its forked worker lives on
        parent.wait()
        time.sleep(0.1)
        monkeypatch.setattr(ftcli.runlock, "_WAIT_S", 0.5)
        held = acquire(run_dir)
        assert held.took_over is not None and held.took_over.startswith(f"pid {pid} on ")
        release(held)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the forked worker too
