"""What every route of ``ftcli serve`` shares: the server's settings and one ``Served`` object (the
predictor, its model ids, the queue and worker, the event loop's tokenizer, the feedback log),
kept on ``app.state.served`` so the routes are plain module-level functions."""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from ftcli.rundir import run_of
from ftcli.serve.api import ApiError
from ftcli.serve.batching import BASE, Batcher, Job, QueueFull, Worker
from ftcli.serve.feedback import FeedbackLog
from ftcli.serve.predictor import Predictor


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
    feedback: Path | None = None  # POST /v1/feedback writes training data only when given a file
    feedback_max_rows: int = 10_000  # rows in the feedback files (both) before 507
    max_prompts: int = 16  # prompts (completions) or inputs (classify) in one request
    max_prompt_chars: int = 100_000  # characters in one prompt (a chat: its messages' text)
    request_timeout: float = 300.0  # seconds from arrival to the whole answer; then 504


T = TypeVar("T")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def key_ok(authorization: str, api_key: str) -> bool:
    """Whether an Authorization header carries the bearer key (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8"), api_key.encode("utf-8")
    )


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers a server bound to loopback answers (its loopback names with the port; bare
    on port 80), so a web page cannot reach it through DNS rebinding; None (any) elsewhere."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return {f"{n}:{port}" for n in LOOPBACK_NAMES} | (set(LOOPBACK_NAMES) if port == 80 else set())


def feedback_rows(log: FeedbackLog) -> int:
    """Rows in the feedback files (trainable and rejected) as they are on disk now."""
    n = 0
    for path in (log.path, log.rejected_path):
        if path.is_file():
            with path.open("rb") as f:
                n += sum(1 for _ in f)
    return n


def model_ids(pred: Predictor) -> dict[str, Any]:
    """Model id -> worker key: each adapter by name and the base (adapters off) by its source;
    a plain folder by its run's name (or its own)."""
    if pred.adapters:
        return {pred.source: BASE, **{n: n for n in pred.adapters}}
    folder = Path(pred.source)
    run = run_of(folder) if folder.exists() else None
    return {(run.name if run else folder.name) or pred.source: None}


def context_of(pred: Predictor) -> int:
    """The most tokens (prompt + answer) a causal LM's positions hold; for a classifier, the
    length it was trained on (what ``ftcli predict`` reads)."""
    if pred.task == "classification":
        # a windows classifier reads a text of any length (as windows of max_length)
        return 1 << 30 if pred.windows else pred.max_length
    cfg = pred.model.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(positions or pred.max_length)


class Served:
    """One loaded Predictor behind the server, and the helpers every route needs to reach it."""

    def __init__(self, pred: Predictor, cfg: ServeConfig):
        self.pred, self.cfg = pred, cfg
        self.batcher = Batcher(cfg.max_batch_size, cfg.max_queue)
        self.worker = Worker(pred, self.batcher)
        self.ids = model_ids(pred)
        self.tok = copy.deepcopy(pred.tokenizer)  # the request side's own: the worker uses pred's
        # one thread tokenizes, off the event loop (a long prompt takes seconds) and never two
        # calls at once on the one tokenizer
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="ftcli-tokenize")
        self.context = context_of(pred)
        self.log = FeedbackLog(cfg.feedback, pred.source) if cfg.feedback else None
        self.feedback_rows = feedback_rows(self.log) if self.log else 0
        self.created = int(time.time())

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the tokenizer thread, awaited without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_thread, partial(fn, *args))

    def deadline(self) -> float:
        """When a request arriving now must have its answer (the event loop's clock)."""
        return asyncio.get_running_loop().time() + self.cfg.request_timeout

    def timed_out(self) -> ApiError:
        return ApiError(
            504,
            f"no answer within {self.cfg.request_timeout:g} s (the server's --timeout): the "
            "server is busy or the answer is long; retry, or ask for fewer max_tokens",
            "timeout",
            "server_error",
        )

    async def within(self, deadline: float, work: Awaitable[T]) -> T:
        """``work``, or 504 once the request's deadline has passed."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(work, remaining)
        except TimeoutError:
            raise self.timed_out() from None

    async def answer(
        self, request: Request, jobs: list[Job], work: Awaitable[T], deadline: float
    ) -> T:
        """``work`` (awaiting the answers of ``jobs``) unless the client leaves or the deadline
        passes first (504). Either way the jobs are then cancelled: the worker drops them from
        the queue, or their rows at the next token, rather than compute for nobody."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_client_gone(request))
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            done, _ = await asyncio.wait(
                {task, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            if gone in done:
                raise ApiError(499, "the client closed the connection", "client_closed")
            raise self.timed_out()
        finally:
            for j in jobs:
                j.cancelled = True
            task.cancel()
            gone.cancel()

    def check_prompts(self, texts: list[str], what: str = "prompt") -> None:
        """400 for more prompts than --max-prompts, 413 for one longer than --max-prompt-chars:
        checked before any tokenizing, which for a long text takes seconds."""
        if len(texts) > self.cfg.max_prompts:
            raise ApiError(
                400,
                f"{len(texts)} {what}s in one request; this server takes at most "
                f"{self.cfg.max_prompts} (its --max-prompts): split them over requests",
                "too_many_prompts",
            )
        for i, t in enumerate(texts):
            if len(t) > self.cfg.max_prompt_chars:
                raise ApiError(
                    413,
                    f"{what} {i} is {len(t):,} characters; this server takes at most "
                    f"{self.cfg.max_prompt_chars:,} (its --max-prompt-chars): shorten it",
                    "prompt_too_long",
                )

    def check_room(self, n: int) -> None:
        """429 at once when the queue has no room for ``n`` more jobs, before the work of
        tokenizing them (``submit`` checks again, atomically)."""
        if len(self.batcher.pending) + n > self.cfg.max_queue:
            raise self.queue_full()

    def queue_full(self) -> ApiError:
        return ApiError(
            429,
            f"the server is busy ({self.cfg.max_queue} requests waiting): retry shortly",
            "queue_full",
            "rate_limit_error",
        )

    def feedback_log(self) -> FeedbackLog:
        """The feedback log when it has room for a row: 403 when feedback is off, 507 when its
        files hold --feedback-max-rows rows (recounted then, in case they were moved away)."""
        if self.log is None:
            raise ApiError(
                403,
                "feedback is off on this server: start it with --feedback FILE to collect "
                "verdicts as training data",
                "feedback_disabled",
            )
        cap = self.cfg.feedback_max_rows
        if self.feedback_rows >= cap:
            self.feedback_rows = feedback_rows(self.log)
        if self.feedback_rows >= cap:
            raise ApiError(
                507,
                f"the feedback files hold {self.feedback_rows:,} rows, this server's "
                f"--feedback-max-rows ({cap:,}): move {self.log.path.name} and "
                f"{self.log.rejected_path.name} away (or restart with a higher cap)",
                "feedback_full",
                "server_error",
            )
        return self.log

    def key_of(self, model: str):
        """The worker key of a request's ``model`` field; 404 naming the served ids otherwise."""
        if model not in self.ids:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here; this server has: {', '.join(self.ids)}",
                "model_not_found",
            )
        return self.ids[model]

    def need(self, task: str, what: str) -> None:
        """400 pointing at the right endpoint when the served model is not a ``task`` model."""
        if self.pred.task != task:
            other = "/v1/classify" if self.pred.task == "classification" else "/v1/chat/completions"
            raise ApiError(
                400,
                f"{what} needs a {task} model; this one is {self.pred.task}: use {other}",
                "wrong_task",
            )

    async def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` with this event loop as their answer's way back; 429 when full."""
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.loop, j.events = loop, asyncio.Queue()
        try:
            self.batcher.submit(jobs)
        except QueueFull:
            raise self.queue_full() from None

    def authorized(self, request: Request) -> bool:
        """Whether the request may see more than ok: no key set, or the key sent."""
        key = self.cfg.api_key
        return not key or key_ok(request.headers.get("authorization", ""), key)


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def served(request: Request) -> Served:
    """The app's Served object (a FastAPI dependency)."""
    return request.app.state.served
