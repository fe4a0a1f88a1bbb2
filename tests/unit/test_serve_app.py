"""``ftcli serve``'s app in process (FastAPI's TestClient over a tiny causal LM): what it refuses
and how, that no request stalls the others or outlives its client or deadline, that feedback is
opt-in and bounded, and that requests waiting together run as one batch."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ftcli.serve.server import ServeConfig, create_app  # noqa: E402

FB = {
    "messages": [{"role": "user", "content": "hi"}],
    "answer": "hello",
    "verdict": "good",
}


@pytest.fixture(scope="module")
def pred(tiny_models):
    from ftcli.serve.predictor import load_predictor

    return load_predictor(str(tiny_models["llama"]))


@contextmanager
def serving(pred, **settings):
    """A running app (worker started) and its shared state; the model id is ``served.model``."""
    app = create_app(pred, ServeConfig(**settings))
    served = app.app.state.served
    served.model = next(iter(served.ids))
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c, served


class Gate:
    """Holds the worker inside its first batch (or every batch, ``hold_all``) until ``release``,
    recording the batches it was handed."""

    def __init__(self, worker, hold_all: bool = False):
        self.entered, self.release, self.batches = threading.Event(), threading.Event(), []
        run = worker.run

        def held(jobs):
            self.batches.append(jobs)
            self.entered.set()
            if hold_all or len(self.batches) == 1:
                self.release.wait(30)
            run(jobs)

        worker.run = held


class SpyTok:
    """The request side's tokenizer, recording what it is asked and sleeping ``delay`` seconds
    (blocking its thread) on a text over 500 characters."""

    def __init__(self, tok, delay: float = 0.0):
        self._tok, self.delay, self.seen, self.slow = tok, delay, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        self.seen.append(text)
        if len(text) > 500:
            self.slow.set()
            time.sleep(self.delay)
        return self._tok(text, **kwargs)


def wait_until(cond, timeout: float = 20) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.02)


def _err(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == code
    return body["error"]


def _complete(client, served, prompt="the film was", **extra):
    body = {"model": served.model, "prompt": prompt, "max_tokens": 2, **extra}
    return client.post("/v1/completions", json=body)


def test_a_long_prompt_is_tokenized_off_the_event_loop(pred):
    with serving(pred) as (client, served):
        served.tok = spy = SpyTok(served.tok, delay=3.0)
        with ThreadPoolExecutor(1) as ex:
            slow = ex.submit(_complete, client, served, "the " * 130)
            assert spy.slow.wait(20)
            t0 = time.perf_counter()
            assert client.get("/health").status_code == 200
            waited = time.perf_counter() - t0
            assert slow.result(60).status_code == 200
        assert waited < 1.5  # on the event loop the tokenizer held every client for its 3 s


def test_a_full_queue_answers_429_before_tokenizing(pred):
    with serving(pred, max_queue=1) as (client, served):
        gate = Gate(served.worker)
        served.tok = spy = SpyTok(served.tok)
        try:
            with ThreadPoolExecutor(2) as ex:
                first = ex.submit(_complete, client, served, "one")
                assert gate.entered.wait(20)  # the worker holds the first
                second = ex.submit(_complete, client, served, "two")
                wait_until(lambda: len(served.batcher.pending) == 1)  # the queue is full
                refused = _complete(client, served, "three")
                gate.release.set()
                assert first.result(60).status_code == second.result(60).status_code == 200
        finally:
            gate.release.set()
        _err(refused, 429, "queue_full")
        assert "three" not in spy.seen


def test_prompts_per_request_and_their_length_are_capped(pred):
    with serving(pred, max_prompts=2, max_prompt_chars=40) as (client, served):
        msg = _err(_complete(client, served, ["a", "b", "c"]), 400, "too_many_prompts")["message"]
        assert "at most 2" in msg and "--max-prompts" in msg
        msg = _err(_complete(client, served, "x" * 41), 413, "prompt_too_long")["message"]
        assert "41 characters" in msg and "--max-prompt-chars" in msg
        chat = {"model": served.model, "messages": [{"role": "user", "content": "y" * 41}]}
        _err(client.post("/v1/chat/completions", json=chat), 413, "prompt_too_long")
        ok = _complete(client, served, ["a", "x" * 40])
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_a_request_past_its_timeout_gets_504_and_its_work_is_dropped(pred):
    with serving(pred, request_timeout=1.0) as (client, served):
        gate = Gate(served.worker, hold_all=True)
        try:
            t0 = time.perf_counter()
            r = _complete(client, served)
            took = time.perf_counter() - t0
            msg = _err(r, 504, "timeout")["message"]
            assert "--timeout" in msg and took < 10
            assert [j.cancelled for j in gate.batches[0]] == [True]  # its row stops at once
            # streamed: the stream ends in a timeout error event
            with client.stream(
                "POST", "/v1/completions", json={**_body(served), "stream": True}
            ) as s:
                events = [x[6:] for x in s.iter_lines() if x.startswith("data: ")]
            assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
        finally:
            gate.release.set()


def _body(served) -> dict:
    return {"model": served.model, "prompt": "the film was", "max_tokens": 2}


def test_a_client_that_leaves_cancels_its_waiting_work(pred):
    """The client hangs up while its request is in the worker: the job is cancelled then, not
    when the worker gets round to finishing it."""
    app = create_app(pred, ServeConfig())
    served = app.app.state.served
    gate = Gate(served.worker)
    body = json.dumps({"model": next(iter(served.ids)), "prompt": "hi", "max_tokens": 2}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def main() -> bool:
        leave, sent = asyncio.Event(), []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        request = asyncio.create_task(app(scope, receive, send))
        assert await asyncio.to_thread(gate.entered.wait, 20)
        (job,) = gate.batches[0]
        leave.set()  # the client hangs up
        for _ in range(100):
            if job.cancelled:
                break
            await asyncio.sleep(0.02)
        cancelled = job.cancelled
        gate.release.set()
        await asyncio.wait_for(request, 60)
        return cancelled

    served.worker.start()
    try:
        assert asyncio.run(main())
    finally:
        gate.release.set()
        served.batcher.close()


def test_feedback_is_off_unless_a_file_is_given(pred, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with serving(pred) as (client, served):
        r = client.post("/v1/feedback", json={**FB, "model": served.model})
        msg = _err(r, 403, "feedback_disabled")["message"]
        assert "--feedback" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_feedback_stops_at_its_row_cap_until_the_rows_move(pred, tmp_path):
    fb = tmp_path / "fb.jsonl"
    with serving(pred, feedback=fb, feedback_max_rows=2) as (client, served):
        row = {**FB, "model": served.model}
        assert client.post("/v1/feedback", json=row).status_code == 200
        assert client.post("/v1/feedback", json={**row, "verdict": "bad"}).status_code == 200
        msg = _err(client.post("/v1/feedback", json=row), 507, "feedback_full")["message"]
        assert "--feedback-max-rows" in msg and "fb.jsonl" in msg
        assert len(fb.read_text().splitlines()) == 1  # the refused row was not written
        fb.rename(tmp_path / "kept.jsonl")  # moved away: room again (1 rejected row of 2)
        assert client.post("/v1/feedback", json=row).status_code == 200
    with serving(pred, feedback=fb, feedback_max_rows=2) as (client, served):
        # a restart counts the rows already there
        _err(client.post("/v1/feedback", json={**FB, "model": served.model}), 507, "feedback_full")


def test_on_loopback_only_local_host_names_are_answered(pred, tmp_path):
    with serving(pred, feedback=tmp_path / "fb.jsonl") as (client, served):
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
            assert client.get("/health", headers={"host": host}).status_code == 200
        for host in ("evil.example:8000", "127.0.0.1:9999", "localhost"):
            _err(client.get("/health", headers={"host": host}), 403, "host_not_allowed")
        r = client.post(
            "/v1/feedback", json={**FB, "model": served.model}, headers={"host": "evil.test:8000"}
        )
        _err(r, 403, "host_not_allowed")
        assert not (tmp_path / "fb.jsonl").exists()
    with serving(pred, host="0.0.0.0") as (client, _):  # bound to every address: any name
        assert client.get("/health", headers={"host": "box.lan:8000"}).status_code == 200


def test_with_a_key_health_and_the_schema_reveal_nothing_without_it(pred):
    with serving(pred, api_key="k") as (client, served):
        r = client.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        _err(client.get("/openapi.json"), 401, "invalid_api_key")
        auth = {"Authorization": "Bearer k"}
        full = client.get("/health", headers=auth).json()
        assert full["models"] == list(served.ids) and full["requests"] == 0
        assert client.get("/openapi.json", headers=auth).status_code == 200


def test_failures_answer_500_without_their_text_and_log_it(pred, caplog):
    secret = "cannot read /home/someone/private/weights.bin"

    def broken(*args):
        raise RuntimeError(secret)

    with serving(pred) as (client, served):
        served.worker.run = broken  # the model fails in the worker
        for stream in (False, True):
            r = client.post("/v1/completions", json={**_body(served), "stream": stream})
            assert "/home/someone" not in r.text and "RuntimeError" not in r.text
            if stream:
                err = json.loads(r.text.split("data: ")[-2])["error"]
            else:
                err = _err(r, 500, "internal_error")
            rid = re.search(r"request id (\w+)", err["message"])[1]
            assert rid in caplog.text
        served.key_of = broken  # a route fails
        r = client.post("/v1/completions", json=_body(served))
        err = _err(r, 500, "internal_error")
        assert "/home/someone" not in r.text and "RuntimeError" not in r.text
        rid = re.search(r"request id (\w+)", err["message"])[1]
    assert any(rid in rec.getMessage() and secret in rec.getMessage() for rec in caplog.records)
    assert secret in caplog.text


def test_requests_that_wait_together_run_as_one_batch(pred):
    """Would fail if batching broke: the four requests queued behind the first run together."""
    with serving(pred, max_batch_size=8) as (client, served):
        gate = Gate(served.worker)  # holds the first batch until the others wait
        try:
            with ThreadPoolExecutor(5) as ex:
                first = ex.submit(_complete, client, served)
                assert gate.entered.wait(20)
                rest = [ex.submit(_complete, client, served) for _ in range(4)]
                wait_until(lambda: len(served.batcher.pending) == 4)
                gate.release.set()
                answers = [f.result(60) for f in (first, *rest)]
        finally:
            gate.release.set()
        assert [a.status_code for a in answers] == [200] * 5
        assert len({a.json()["choices"][0]["text"] for a in answers}) == 1  # same greedy answer
        assert [len(b) for b in gate.batches] == [1, 4]
        assert served.worker.stats == {"requests": 5, "batches": 2, "largest_batch": 4}
