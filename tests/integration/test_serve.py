"""``ftcli serve`` end to end: the real server in a subprocess on a free localhost port, tiny
trained adapters behind it, the official openai client and plain httpx in front."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import trained_run

pytestmark = pytest.mark.slow  # two server processes and four tiny training runs

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "what is 3 plus 4 ?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m ftcli serve ...`` in a subprocess; killed at teardown."""

    def __init__(self, args: list[str], tmp: Path, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ftcli", "serve", *args, "--port", str(self.port)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp,
        )

    def wait(self, timeout: float = 300) -> None:  # start-up is slow on a loaded machine
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not up in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tiny_data):
    """Two causal LoRA runs and two classification LoRA runs on one tiny base each."""
    return {
        "chat_a": trained_run(tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora", 0),
        "chat_b": trained_run(
            tmp_path_factory, tiny_models, tiny_data, "causal_lm", "lora", 1, lr=5.0e-2
        ),
        "cls_a": trained_run(tmp_path_factory, tiny_models, tiny_data, "classification", "lora", 0),
        "cls_b": trained_run(
            tmp_path_factory, tiny_models, tiny_data, "classification", "lora", 1, lr=5.0e-2
        ),
    }


@pytest.fixture(scope="module")
def servers(runs, tmp_path_factory):
    """A chat server (key from FTCLI_API_KEY) and a classifier server (key from --api-key),
    started together so their start-ups overlap."""
    tmp = tmp_path_factory.mktemp("serve")
    chat = Server(
        [
            "--adapter",
            f"a={runs['chat_a']}",
            "--adapter",
            f"b={runs['chat_b']}",
            "--max-tokens",
            "24",
            "--max-body",
            "20000",
            "--feedback",
            str(tmp / "fb.jsonl"),
            "--max-prompts",
            "4",
            "--max-prompt-chars",
            "5000",
            "--timeout",
            "120",
        ],
        tmp,
        env={"FTCLI_API_KEY": "chat-key"},
    )
    cls = Server(
        [
            "--adapter",
            f"a={runs['cls_a']}",
            "--adapter",
            f"b={runs['cls_b']}",
            "--api-key",
            "cls-key",
            "--feedback",
            str(tmp / "cls-fb.jsonl"),
            "--feedback-max-rows",
            "2",
        ],
        tmp,
    )
    try:
        chat.wait()
        cls.wait()
        yield {"chat": chat, "cls": cls, "tmp": tmp}
    finally:
        chat.stop()
        cls.stop()


def _local(runs, *names):
    from ftcli.serve.predictor import load_predictor

    return load_predictor(None, [f"{n}={runs[k]}" for n, k in names])


def test_chat_with_the_openai_client(servers, runs):
    client = openai.OpenAI(base_url=servers["chat"].url + "/v1", api_key="chat-key")
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == ["a", "b"] and len(ids) == 3  # the base first, then each adapter

    answers = {}
    for name in ("a", "b"):
        r = client.chat.completions.create(model=name, messages=PROMPT, max_tokens=12)
        answers[name] = r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        # streamed: the same greedy answer, in more than one chunk when it is more than a token
        chunks = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=name, messages=PROMPT, max_tokens=12, stream=True
            )
            if c.choices
        ]
        assert "".join(chunks) == answers[name]
        if r.usage.completion_tokens > 1:
            assert sum(1 for c in chunks if c) > 1
    assert answers["a"] != answers["b"]  # the model field really picks the adapter

    # each adapter answers exactly as the same adapter does in process (ftcli predict's path)
    pred = _local(runs, ("a", "chat_a"), ("b", "chat_b"))
    for name in ("a", "b"):
        pred.use(name)
        assert pred.generate([PROMPT], max_new_tokens=12)[0] == answers[name].strip()

    base = client.chat.completions.create(model=ids[0], messages=PROMPT, max_tokens=12)
    with pred.model.disable_adapter():
        assert (
            pred.generate([PROMPT], max_new_tokens=12)[0] == base.choices[0].message.content.strip()
        )

    c = client.completions.create(model="a", prompt="what is 2 plus", max_tokens=5)
    assert c.choices[0].text and c.usage.completion_tokens <= 5


def test_concurrent_requests_share_batches(servers):
    """Requests arriving together for one adapter are answered right, and some of them share a
    batch: fewer batches run than requests."""
    import concurrent.futures as cf

    client = openai.OpenAI(base_url=servers["chat"].url + "/v1", api_key="chat-key")
    stats = lambda: httpx.get(  # noqa: E731
        servers["chat"].url + "/health", headers={"Authorization": "Bearer chat-key"}
    ).json()

    def ask(i):
        name = "ab"[i % 2]
        r = client.chat.completions.create(model=name, messages=PROMPT, max_tokens=8)
        return name, r.choices[0].message.content

    alone = {
        n: client.chat.completions.create(model=n, messages=PROMPT, max_tokens=8)
        .choices[0]
        .message.content
        for n in "ab"
    }
    before = stats()
    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, range(16)))
    assert all(text == alone[name] for name, text in got)
    health = stats()
    assert health["requests"] >= 18
    requests, batches = (health[k] - before[k] for k in ("requests", "batches"))
    assert requests == 16 and batches < requests, (requests, batches)


def _err(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == code
    assert "Traceback" not in resp.text
    return body["error"]


def test_errors_are_clean_json_and_the_server_keeps_serving(servers):
    url = servers["chat"].url
    auth = {"Authorization": "Bearer chat-key"}
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    _err(
        post("/v1/chat/completions", json={"model": "a", "messages": PROMPT}),
        401,
        "invalid_api_key",
    )
    _err(
        post(
            "/v1/chat/completions",
            json={"model": "a", "messages": PROMPT},
            headers={"Authorization": "Bearer wrong"},
        ),
        401,
        "invalid_api_key",
    )
    msg = _err(
        post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={**auth, "Content-Type": "application/json"},
        ),
        400,
        "invalid_request",
    )["message"]
    assert "not valid JSON" in msg
    msg = _err(
        post("/v1/chat/completions", content=b"[1, 2]", headers=auth), 400, "invalid_request"
    )["message"]
    assert "JSON object" in msg
    _err(post("/v1/chat/completions", json={"model": "a"}, headers=auth), 400, "invalid_request")
    msg = _err(
        post("/v1/chat/completions", json={"model": "zzz", "messages": PROMPT}, headers=auth),
        404,
        "model_not_found",
    )["message"]
    assert "'a'" not in msg and "a, b" in msg
    long = [{"role": "user", "content": " ".join(["what is 3 plus 4 ?"] * 60)}]
    msg = _err(
        post("/v1/chat/completions", json={"model": "a", "messages": long}, headers=auth),
        400,
        "context_length_exceeded",
    )["message"]
    assert "context is 256 tokens" in msg
    _err(
        post(
            "/v1/chat/completions",
            json={"model": "a", "messages": PROMPT, "max_tokens": 1000},
            headers=auth,
        ),
        400,
        "max_tokens_too_large",
    )
    _err(
        post(
            "/v1/chat/completions",
            content=b'{"model": "a", "x": "' + b"y" * 30000 + b'"}',
            headers={**auth, "Content-Type": "application/json"},
        ),
        413,
        "request_too_large",
    )
    _err(post("/v1/classify", json={"model": "a", "input": "hi"}, headers=auth), 400, "wrong_task")
    msg = _err(
        post("/v1/completions", json={"model": "a", "prompt": ["hi"] * 5}, headers=auth),
        400,
        "too_many_prompts",
    )["message"]
    assert "--max-prompts" in msg
    _err(
        post("/v1/completions", json={"model": "a", "prompt": "x" * 5001}, headers=auth),
        413,
        "prompt_too_long",
    )
    # a page that reached the port by DNS rebinding names its own host: refused
    _err(
        httpx.get(url + "/v1/models", headers={**auth, "Host": "evil.test"}),
        403,
        "host_not_allowed",
    )
    # without the key: /health says only that it is up, the schema is refused
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    _err(httpx.get(url + "/openapi.json"), 401, "invalid_api_key")
    _err(httpx.get(url + "/v1/nothing", headers=auth), 404, "not_found")
    # still serving, with the key
    r = post(
        "/v1/chat/completions",
        json={"model": "b", "messages": PROMPT, "max_tokens": 4},
        headers=auth,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_classify_two_adapters_and_feedback(servers, runs):
    url = servers["cls"].url
    auth = {"Authorization": "Bearer cls-key"}
    texts = ["the film was wonderful and lovely", "a dull and tedious plot"]
    assert httpx.post(url + "/v1/classify", json={"model": "a", "input": texts}).status_code == 401
    pred = _local(runs, ("a", "cls_a"), ("b", "cls_b"))
    for name in ("a", "b"):
        r = httpx.post(url + "/v1/classify", json={"model": name, "input": texts}, headers=auth)
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        pred.use(name)
        want = pred.classify(texts)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want, strict=True):
            assert set(g["probs"]) == {"neg", "pos"}
            assert g["probs"] == pytest.approx(w["probs"], abs=1e-5)
    # the two adapters give different probabilities for the same text
    pa, pb = (
        httpx.post(url + "/v1/classify", json={"model": n, "input": texts[0]}, headers=auth).json()[
            "data"
        ][0]["probs"]["pos"]
        for n in "ab"
    )
    assert abs(pa - pb) > 1e-4

    r = httpx.post(
        url + "/v1/feedback",
        headers=auth,
        json={
            "model": "b",
            "text": texts[1],
            "predicted": "pos",
            "verdict": "fixed",
            "correct": "neg",
        },
    )
    assert r.status_code == 200, r.text
    _err(
        httpx.post(
            url + "/v1/feedback",
            headers=auth,
            json={
                "model": "b",
                "text": texts[1],
                "predicted": "pos",
                "verdict": "fixed",
                "correct": "maybe",
            },
        ),
        400,
        "invalid_feedback",
    )
    row = json.loads((servers["tmp"] / "cls-fb.jsonl").read_text().splitlines()[-1])
    assert row["text"] == texts[1] and row["label"] == "neg" and row["adapter"] == "b"
    assert row["feedback"] == "fixed" and row["predicted"] == "pos"
    # --feedback-max-rows 2: one more row, then the files are full
    good = {"model": "a", "text": texts[0], "predicted": "pos", "verdict": "good"}
    assert httpx.post(url + "/v1/feedback", headers=auth, json=good).status_code == 200
    msg = _err(httpx.post(url + "/v1/feedback", headers=auth, json=good), 507, "feedback_full")[
        "message"
    ]
    assert "--feedback-max-rows" in msg
    assert len((servers["tmp"] / "cls-fb.jsonl").read_text().splitlines()) == 2
    _err(
        httpx.post(url + "/v1/classify", json={"model": "a", "input": ["hi"] * 17}, headers=auth),
        400,
        "too_many_prompts",
    )


def test_chat_feedback_writes_chat_rows(servers):
    url, auth = servers["chat"].url, {"Authorization": "Bearer chat-key"}
    for verdict, extra in (("good", {}), ("bad", {})):
        r = httpx.post(
            url + "/v1/feedback",
            headers=auth,
            json={
                "model": "a",
                "messages": PROMPT,
                "answer": "3 plus 4 is 7 .",
                "verdict": verdict,
                **extra,
            },
        )
        assert r.status_code == 200, r.text
    good = json.loads((servers["tmp"] / "fb.jsonl").read_text().splitlines()[-1])
    assert good["messages"] == [*PROMPT, {"role": "assistant", "content": "3 plus 4 is 7 ."}]
    assert good["adapter"] == "a" and good["feedback"] == "good"
    bad = json.loads((servers["tmp"] / "fb-rejected.jsonl").read_text().splitlines()[-1])
    assert bad["messages"] == PROMPT and bad["rejected"] == "3 plus 4 is 7 ."
