"""The data stage's worker pool (ftcli/data/pool.py): a block that stops reading early lets the
workers exit by themselves instead of killing them (a worker killed while it holds the results
queue's lock left the pool waiting forever: CPython issue 96995)."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from functools import partial

import pytest

from ftcli.data import pool


def _slow_task(task: int, log: str) -> int:
    """Note the task as started (one line each, appended), then take a while."""
    with open(log, "a") as f:
        f.write(f"{task}\n")
    time.sleep(0.2)
    return task


@pytest.mark.parametrize("how", ["return", "error"])
def test_a_block_that_stops_early_skips_the_rest_and_lets_the_workers_exit(tmp_path, how):
    log = tmp_path / "started.txt"
    got, procs = [], []
    expect = pytest.raises(RuntimeError) if how == "error" else contextlib.nullcontext()
    with expect, pool.workers(partial(_slow_task, log=str(log)), 2) as imap:
        procs = multiprocessing.active_children()
        for r in imap(range(40)):
            got.append(r)
            if len(got) == 2:
                if how == "error":
                    raise RuntimeError("the caller gave up")
                break
    assert got == [0, 1]
    started = log.read_text().split()
    assert len(started) < 40  # the tasks not started when the block ended were skipped
    workers = [p for p in procs if p.exitcode is not None]
    assert len(workers) >= 2
    assert all(p.exitcode == 0 for p in workers)  # exited by themselves, not terminated
    assert not multiprocessing.active_children()


def test_every_result_comes_back_in_task_order(tmp_path):
    log = tmp_path / "started.txt"
    with pool.workers(partial(_slow_task, log=str(log)), 2) as imap:
        assert list(imap(range(6))) == list(range(6))
    assert sorted(map(int, log.read_text().split())) == list(range(6))
