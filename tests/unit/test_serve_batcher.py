"""The serve queue: batches group waiting requests by adapter (oldest first), bounded in size and
length; streamed rows stop on their own limits."""

from __future__ import annotations

import pytest

from ftcli.serve.batching import Batcher, Job, QueueFull, _Rows


def test_batches_take_the_oldest_key_and_its_waiting_peers():
    b = Batcher(max_batch_size=2, max_queue=10)
    jobs = [Job((k, "generate"), i) for i, k in enumerate("abaab")]
    b.submit(jobs)
    assert [j.payload for j in b.take(0)] == [0, 2]  # a's first two, in order
    assert [j.payload for j in b.take(0)] == [1, 4]  # then b: the oldest waiting now
    assert [j.payload for j in b.take(0)] == [3]
    assert b.take(0) == []


def test_a_full_queue_refuses_and_cancelled_jobs_are_dropped():
    b = Batcher(max_batch_size=8, max_queue=3)
    b.submit([Job(("a", "classify"), "x"), Job(("a", "classify"), "y")])
    with pytest.raises(QueueFull):
        b.submit([Job(("a", "classify"), "z"), Job(("a", "classify"), "w")])
    assert len(b.pending) == 2  # nothing of the refused request was queued
    b.pending[0].cancelled = True
    assert [j.payload for j in b.take(0)] == ["y"]


class _Tok:
    """Decodes token t as the character chr(t)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _events(job):
    out = []
    job.emit = lambda *ev: out.append(ev)
    return out


def test_rows_stop_at_eos_limit_and_stop_strings_without_leaking_them():
    import torch

    a, b, c = (
        Job(("m", "generate"), [1, 2], max_tokens=n, stop=s)
        for n, s in ((10, ()), (2, ()), (10, ("XY",)))
    )
    ev = [_events(j) for j in (a, b, c)]
    rows = _Rows([a, b, c], _Tok(), eos={0})
    rows.put(torch.tensor([[1, 2], [1, 2], [1, 2]]))  # the prompt
    for step in ([ord("h"), ord("h"), ord("h")], [0, ord("i"), ord("X")], [5, 5, ord("Y")]):
        rows.put(torch.tensor(step))
        if step[0] == 0:
            assert rows(torch.zeros(3, 1), None).tolist() == [True, True, False]
    assert ev[0] == [("delta", "h"), ("done", "stop", 2, 1)]
    assert ev[1] == [("delta", "h"), ("delta", "i"), ("done", "length", 2, 2)]
    assert ev[2] == [("delta", "h"), ("done", "stop", 2, 3)]  # "X" was held back, then cut
    assert rows(torch.zeros(3, 1), None).tolist() == [True, True, True]
