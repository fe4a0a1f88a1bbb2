"""``ftcli serve``: a Predictor behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the oldest
and every waiting request that shares its adapter and settings (up to a batch size), switches the
adapter once and runs them as one batch. Tokens go back through asyncio queues, so the worker
never waits on a client socket: a slow or vanished client holds only its own connection.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ftcli.data.tokenize import render_chat
from ftcli.errors import FtcliError
from ftcli.rundir import run_of
from ftcli.serve.feedback import FeedbackLog
from ftcli.serve.predictor import Predictor

BASE = object()  # the key of requests for the base model with every adapter switched off


@dataclass(frozen=True)
class ServeConfig:
    """The server's bounds and where it listens."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    feedback: Path = Path("feedback.jsonl")


class ApiError(Exception):
    """An error the client caused (or a full queue), answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


def error_body(status: int, message: str, code: str, type_: str = "invalid_request_error"):
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status_code=status,
        headers={"Retry-After": "1"} if status == 429 else None,
    )


# ------------------------------------------------------------------------------- queue and batches


@dataclass(eq=False)
class Job:
    """One request (or one prompt of it) waiting for the model; results go to ``events``."""

    key: tuple  # requests with equal keys may share a batch: (adapter, kind, settings...)
    payload: Any  # token ids (generation) or a text (classification)
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False

    def emit(self, *event) -> None:
        """Hand an event to the request's event loop without ever waiting on it."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    pass


class Batcher:
    """A bounded queue that hands out batches of waiting jobs sharing the oldest job's key."""

    def __init__(self, max_batch_size: int, max_queue: int):
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.closed = False

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            if len(self.pending) + len(jobs) > self.max_queue:
                raise QueueFull
            self.pending += jobs
            self.cond.notify()

    def take(self, timeout: float | None = None) -> list[Job]:
        """The oldest waiting job and the next waiting ones with its key, at most max_batch_size;
        [] after ``timeout`` seconds with nothing waiting, or once closed."""
        with self.cond:
            self.cond.wait_for(lambda: self.pending or self.closed, timeout)
            if not self.pending:
                return []
            key = self.pending[0].key
            batch = [j for j in self.pending if j.key == key][: self.max_batch_size]
            taken = set(map(id, batch))
            self.pending = [j for j in self.pending if id(j) not in taken]
            return [j for j in batch if not j.cancelled]

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _Rows(BaseStreamer, StoppingCriteria):
    """Per-row streaming for a batched ``generate``: decodes each row's new tokens, emits text
    deltas to its job, and stops a row at EOS, at a stop string, at its own max_tokens, or when
    its client has gone."""

    def __init__(self, jobs: list[Job], tokenizer, eos: set[int]):
        self.jobs, self.tok, self.eos = jobs, tokenizer, eos
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [0] * len(jobs)  # characters already emitted
        self.done: list[str | None] = [None] * len(jobs)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for i, t in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.done[i]:
                continue
            if job.cancelled:
                self.done[i] = "cancelled"
                continue
            if t in self.eos:
                self._emit(i, self.tok.decode(self.tokens[i], skip_special_tokens=True))
                self._finish(i, "stop")
                continue
            self.tokens[i].append(t)
            text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
            cut = min((text.find(s) for s in job.stop if s in text), default=-1)
            if cut >= 0:
                self._emit(i, text[:cut])
                self._finish(i, "stop")
                continue
            if len(self.tokens[i]) >= job.max_tokens:
                self._emit(i, text)
                self._finish(i, "length")
                continue
            # hold back a half-decoded character and anything that may start a stop string
            hold = len(text) - len(text.rstrip("\ufffd"))
            for s in job.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            self._emit(i, text[: len(text) - hold])

    def _emit(self, i: int, text: str) -> None:
        if len(text) > self.sent[i]:
            self.jobs[i].emit("delta", text[self.sent[i] :])
            self.sent[i] = len(text)

    def _finish(self, i: int, reason: str) -> None:
        self.done[i] = reason
        self.jobs[i].emit("done", reason, len(self.jobs[i].payload), len(self.tokens[i]))

    def end(self) -> None:
        for i in range(len(self.jobs)):  # rows cut by the batch's max_new_tokens
            if not self.done[i]:
                text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
                self._emit(i, text)
                self._finish(i, "length")

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([d is not None for d in self.done], device=input_ids.device)


class Worker:
    """The one thread that touches the model: takes batches from the Batcher and runs them."""

    def __init__(self, pred: Predictor, batcher: Batcher):
        self.pred, self.batcher = pred, batcher
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self.thread = threading.Thread(target=self._loop, name="ftcli-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.batcher.closed:
            jobs = self.batcher.take(timeout=1.0)
            if not jobs:
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
            try:
                self.run(jobs)
            except Exception as exc:  # the model failed: every job in the batch hears why
                for j in jobs:
                    j.emit("error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    def run(self, jobs: list[Job]) -> None:
        adapter, kind = jobs[0].key[:2]
        pred = self.pred
        if adapter is BASE:
            ctx = pred.model.disable_adapter()
        else:
            pred.use(adapter)
            ctx = nullcontext()
        with ctx:
            if kind == "classify":
                for j, r in zip(
                    jobs, pred.classify([j.payload for j in jobs], len(jobs)), strict=True
                ):
                    j.emit("result", r)
            else:
                self._generate(jobs, temperature=jobs[0].key[2], top_p=jobs[0].key[3])

    def _generate(self, jobs: list[Job], temperature: float, top_p: float | None) -> None:
        pred, tok = self.pred, self.pred.tokenizer
        eos_id = tok.eos_token_id
        gen_eos = getattr(pred.model.generation_config, "eos_token_id", None)
        eos = {eos_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        eos.discard(None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos_id
        width = max(len(j.payload) for j in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, j in enumerate(jobs):  # left padding: every prompt ends where generation begins
            ids[r, width - len(j.payload) :] = torch.tensor(j.payload)
            mask[r, width - len(j.payload) :] = 1
        rows = _Rows(jobs, tok, eos)
        kwargs: dict = {
            "max_new_tokens": max(j.max_tokens for j in jobs),
            "pad_token_id": pad,
            "eos_token_id": sorted(eos),
            "streamer": rows,
            "stopping_criteria": StoppingCriteriaList([rows]),
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:  # greedy: drop sampling settings a generation_config may carry
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            pred.model.generate(
                input_ids=ids.to(pred.device), attention_mask=mask.to(pred.device), **kwargs
            )


# ------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones can be read
            if any(p.get("type") != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", "unsupported_content")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class _Sampling(_Body):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | int | None = None
    tools: list | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "n must be 1: one answer per request", "unsupported_parameter")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", "unsupported_parameter")
        if self.tools:
            raise ApiError(400, "tools are not supported", "unsupported_parameter")

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or any(not x for x in s):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_stop")
        return tuple(s)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ClassifyBody(_Body):
    input: str | list[str]


class FeedbackBody(_Body):
    verdict: Literal["good", "bad", "fixed"]
    correct: str | None = None
    messages: list[Message] | None = None  # chat: the conversation before the answer
    answer: str | None = None
    text: str | None = None  # classification: the text and the predicted label
    predicted: str | None = None


# ------------------------------------------------------------------------------- the app


def model_ids(pred: Predictor) -> dict[str, Any]:
    """Model id -> worker key: each adapter by name and the base (adapters off) by its source;
    a plain folder by its run's name (or its own)."""
    if pred.adapters:
        return {pred.source: BASE, **{n: n for n in pred.adapters}}
    folder = Path(pred.source)
    run = run_of(folder) if folder.exists() else None
    return {(run.name if run else folder.name) or pred.source: None}


def _context(pred: Predictor) -> int:
    """The most tokens (prompt + answer) a causal LM's positions hold; for a classifier, the
    length it was trained on (what ``ftcli predict`` reads)."""
    if pred.task == "classification":
        return pred.max_length
    cfg = pred.model.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(positions or pred.max_length)


class _Guard:
    """ASGI middleware: bearer-token check on /v1/ (constant-time compare) and a body-size limit,
    both before the app reads a byte of the body."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8"), self.api_key.encode("utf-8")
            ):
                msg = "missing API key" if not auth else "incorrect API key"
                return await error_body(
                    401,
                    f"{msg}: send 'Authorization: Bearer <key>' (the server's --api-key)",
                    "invalid_api_key",
                )(scope, receive, send)
        too_big = error_body(413, f"request body over {self.max_body:,} bytes", "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await too_big(scope, receive, send)
        messages, size = [], 0
        while True:  # buffer the body (bounded) so a chunked upload cannot go over the limit
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return await too_big(scope, receive, send)
            messages.append(msg)
            if not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def _first_error(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "invalid request body"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if tuple(e.get("loc", ())) == ("body",):
        return "the request body must be a JSON object (Content-Type: application/json)"
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{where}: {e.get('msg')}" if where else str(e.get("msg"))


def create_app(pred: Predictor, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app over one loaded Predictor; the model worker starts with the app."""
    batcher = Batcher(cfg.max_batch_size, cfg.max_queue)
    worker = Worker(pred, batcher)
    ids = model_ids(pred)
    tok = copy.deepcopy(pred.tokenizer)  # the event loop's own: the worker uses pred.tokenizer
    context = _context(pred)
    log = FeedbackLog(cfg.feedback, pred.source)
    created = int(time.time())

    async def lifespan(app):
        worker.start()
        yield
        batcher.close()

    app = FastAPI(title="ftcli serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_body(exc.status, exc.message, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_body(400, _first_error(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_body(exc.status_code, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # never a traceback on the wire
        return error_body(
            500,
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "internal_error",
            "server_error",
        )

    def key_of(model: str):
        if model not in ids:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here; this server has: {', '.join(ids)}",
                "model_not_found",
            )
        return ids[model]

    def need(task: str, what: str) -> None:
        if pred.task != task:
            other = "/v1/classify" if pred.task == "classification" else "/v1/chat/completions"
            raise ApiError(
                400,
                f"{what} needs a {task} model; this one is {pred.task}: use {other}",
                "wrong_task",
            )

    async def submit(jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.loop, j.events = loop, asyncio.Queue()
        try:
            batcher.submit(jobs)
        except QueueFull:
            raise ApiError(
                429,
                f"the server is busy ({cfg.max_queue} requests waiting): retry shortly",
                "queue_full",
                "rate_limit_error",
            ) from None

    def generation_jobs(body: _Sampling, prompts: list[str], special: bool, key) -> list[Job]:
        body.check_supported()
        stops = body.stops()
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > cfg.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {asked}; this server answers with at most {cfg.max_tokens} "
                "(its --max-tokens)",
                "max_tokens_too_large",
            )
        jobs = []
        for p in prompts:
            ids_ = tok(p, add_special_tokens=special)["input_ids"] if p else []
            ids_ = ids_ or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
            room = context - len(ids_)
            want = asked if asked is not None else min(cfg.max_tokens, room)
            if want < 1 or len(ids_) + want > context:
                raise ApiError(
                    400,
                    f"this model's context is {context} tokens; the prompt is {len(ids_)} "
                    f"tokens{f' and max_tokens {asked}' if asked is not None else ''}, which "
                    "leaves no room for the answer: shorten the prompt"
                    + (" or lower max_tokens" if asked is not None else ""),
                    "context_length_exceeded",
                )
            jobs.append(Job((key, "generate", body.temperature, body.top_p), ids_, want, stops))
        return jobs

    async def collect(job: Job) -> tuple[str, str, int, int]:
        parts = []
        while True:
            ev = await job.events.get()
            if ev[0] == "delta":
                parts.append(ev[1])
            elif ev[0] == "done":
                return "".join(parts), ev[1], ev[2], ev[3]
            elif ev[0] == "error":
                raise ApiError(500, f"generation failed: {ev[1]}", "internal_error", "server_error")

    def stream(job: Job, chunk: Callable[[str | None, str | None], dict], usage: bool):
        async def events():
            try:
                first = chunk(None, None)
                if first:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    ev = await job.events.get()
                    if ev[0] == "delta":
                        yield f"data: {json.dumps(chunk(ev[1], None))}\n\n"
                    elif ev[0] == "done":
                        yield f"data: {json.dumps(chunk(None, ev[1]))}\n\n"
                        if usage:
                            u = chunk(None, None, usage=(ev[2], ev[3])) or {}
                            yield f"data: {json.dumps(u)}\n\n"
                        break
                    else:
                        err = {
                            "error": {
                                "message": ev[1],
                                "type": "server_error",
                                "code": "internal_error",
                            }
                        }
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client that left stops its row at the next token

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def usage_of(p: int, c: int) -> dict:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "task": pred.task,
            "models": list(ids),
            "queued": len(batcher.pending),
            **worker.stats,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": created,
                    "owned_by": "ftcli",
                    "task": pred.task,
                    "adapter": k is not None and k is not BASE,
                }
                for m, k in ids.items()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        key = key_of(body.model)
        need("causal_lm", "chat")
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        try:
            prompt = render_chat(tok, msgs, add_generation_prompt=True)
        except Exception as exc:  # a template that refuses this conversation (roles, order)
            raise ApiError(
                400, f"the chat template refused the messages: {exc}", "invalid_messages"
            ) from None
        special = not getattr(tok, "chat_template", None)
        (job,) = generation_jobs(body, [prompt], special, key)
        await submit([job])
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            def chunk(delta, finish, usage=None):
                base = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": now,
                    "model": body.model,
                }
                if usage:
                    return {**base, "choices": [], "usage": usage_of(*usage)}
                d = (
                    {"role": "assistant", "content": ""}
                    if delta is None and finish is None
                    else ({"content": delta} if delta is not None else {})
                )
                return {
                    **base,
                    "choices": [
                        {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                    ],
                }

            return stream(job, chunk, bool((body.stream_options or {}).get("include_usage")))
        try:
            text, finish, p, c = await collect(job)
        finally:
            job.cancelled = True
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage_of(p, c),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        key = key_of(body.model)
        need("causal_lm", "completions")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt must be a string or a list of strings", "invalid_prompt")
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "streaming takes one prompt", "unsupported_parameter")
        jobs = generation_jobs(body, prompts, True, key)
        await submit(jobs)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            def chunk(delta, finish, usage=None):
                base = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
                if usage:
                    return {**base, "choices": [], "usage": usage_of(*usage)}
                if delta is None and finish is None:
                    return None
                return {
                    **base,
                    "choices": [
                        {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                    ],
                }

            return stream(jobs[0], chunk, bool((body.stream_options or {}).get("include_usage")))
        try:
            results = [await collect(j) for j in jobs]
        finally:
            for j in jobs:
                j.cancelled = True
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": body.model,
            "choices": [
                {"index": i, "text": t, "logprobs": None, "finish_reason": f}
                for i, (t, f, _, _) in enumerate(results)
            ],
            "usage": usage_of(sum(r[2] for r in results), sum(r[3] for r in results)),
        }

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        key = key_of(body.model)
        need("classification", "classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input is empty", "invalid_input")
        for i, t in enumerate(texts):
            n = len(tok(t)["input_ids"])
            if n > context:
                raise ApiError(
                    400,
                    f"input {i} is {n} tokens; this classifier reads at most {context} "
                    "(the data.max_length it was trained with): shorten it",
                    "context_length_exceeded",
                )
        jobs = [Job((key, "classify"), t) for t in texts]
        await submit(jobs)
        out = []
        for i, j in enumerate(jobs):
            ev = await j.events.get()
            if ev[0] == "error":
                raise ApiError(
                    500, f"classification failed: {ev[1]}", "internal_error", "server_error"
                )
            out.append({"index": i, **ev[1]})
        return {"object": "list", "model": body.model, "data": out}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody):
        key = key_of(body.model)
        adapter = key if isinstance(key, str) else None
        try:
            if pred.task == "classification":
                if body.text is None or body.predicted is None:
                    raise ApiError(
                        400, "classification feedback needs text and predicted", "invalid_feedback"
                    )
                labels = pred.labels.get(adapter) or pred.labels.get(None) or []
                log.classification(
                    body.text, body.predicted, body.verdict, labels, body.correct, adapter
                )
            else:
                if body.messages is None or body.answer is None:
                    raise ApiError(
                        400,
                        "chat feedback needs messages (the conversation before "
                        "the answer) and answer",
                        "invalid_feedback",
                    )
                if body.verdict == "fixed" and not body.correct:
                    raise ApiError(
                        400, "a fixed verdict needs correct (the right answer)", "invalid_feedback"
                    )
                ctx = [{"role": m.role, "content": m.text()} for m in body.messages]
                log.chat(ctx, body.answer, body.verdict, body.correct, adapter)
        except FtcliError as exc:
            raise ApiError(400, exc.render(), "invalid_feedback") from None
        path = log.rejected_path if body.verdict == "bad" else log.path
        return {"ok": True, "verdict": body.verdict, "file": str(path)}

    return _Guard(app, cfg.api_key, cfg.max_body_bytes)


def serve(model: str | None, adapters: list[str] | None, cfg: ServeConfig, say=print) -> dict:
    """Load the model once, then answer HTTP requests until interrupted."""
    import uvicorn

    from ftcli.serve.predictor import load_predictor

    pred = load_predictor(model, adapters)
    app = create_app(pred, cfg)
    ids = model_ids(pred)
    say(
        f"serving {pred.task} on http://{cfg.host}:{cfg.port}/v1 ({pred.device}); "
        f"models: {', '.join(ids)}"
    )
    if not cfg.api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {cfg.host} with no API key: anyone who reaches it can use it")
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_keep_alive=5,
        )
    )
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise FtcliError(
            f"cannot listen on {cfg.host}:{cfg.port}",
            hint="is another server using the port? --port N",
        ) from exc
    return {"served": list(ids), **app.app.state.worker.stats}
