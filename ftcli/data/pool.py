"""The data stage's worker processes: one pool helper for reading large jsonl files
(data/examples.py) and tokenizing (data/tokenize.py), so both start, share and clean up their
workers the same way."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

# fork on Linux (fast, and the workers share the parent's pages); elsewhere the platform's own
# default (macOS spawns: forking a process holding torch and Rust threads is not safe there)
START_METHOD = "fork" if sys.platform == "linux" else None

# the function the workers run, set in each by the pool's initializer: a forked worker inherits
# it (a tokenizer in it is not pickled), a spawned one unpickles it
_TASK_FN: Callable | None = None
# set by the parent when it stops reading results early: the tasks not yet started are skipped
_STOP = None


def num_procs(recipe) -> int:
    """data.num_proc, or the cores this process may run on."""
    if recipe.data.num_proc:
        return recipe.data.num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _set_task_fn(fn: Callable, stop) -> None:
    global _TASK_FN, _STOP
    _TASK_FN, _STOP = fn, stop


def _run(task):
    if _STOP is not None and _STOP.is_set():
        return None  # nobody reads it
    return _TASK_FN(task)


@contextmanager
def workers(fn: Callable, procs: int) -> Iterator[Callable[[Iterable], Iterator]]:
    """``procs`` worker processes that run ``fn``; yields ``imap(tasks)``: ``fn(task)`` for each
    task, the results in task order. The pool is gone when the block ends, however it ends.

    A block that ends before reading every result (a range the reader gives up on, an error)
    lets the workers finish the tasks they are running, skips the others and waits for the
    workers to exit by themselves. Killing them (``Pool.terminate``) can kill one while it
    holds the results queue's lock, and the pool's own thread then waits for that lock forever
    (CPython issue 96995); only an interrupt (Ctrl-C) kills them.

    The workers run with TOKENIZERS_PARALLELISM off (the tokenizer's own threads would fight
    them for the cores, and warn after a fork), and the parent's objects are frozen out of the
    garbage collector's reach meanwhile, so forked children keep sharing those pages."""
    import gc
    import multiprocessing

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    gc.freeze()  # no collection first: 0.17 s with torch loaded, and garbage frozen is harmless
    try:
        ctx = multiprocessing.get_context(START_METHOD)
        stop = ctx.Event()
        pool = ctx.Pool(procs, initializer=_set_task_fn, initargs=(fn, stop))
        interrupted = True
        try:
            yield lambda tasks: pool.imap(_run, tasks)
            interrupted = False
        except Exception:
            interrupted = False
            raise
        finally:
            stop.set()  # whatever was not read is not wanted
            if interrupted:  # Ctrl-C: stop now
                pool.terminate()
            else:
                pool.close()
                pool.join()
    finally:
        gc.unfreeze()
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
