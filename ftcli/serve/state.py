"""What every route of ``ftcli serve`` shares: the server's settings and one ``Served`` object (the
predictor, its model ids, the queue and worker, the event loop's tokenizer, the feedback log),
kept on ``app.state.served`` so the routes are plain module-level functions."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    feedback: Path = Path("feedback.jsonl")


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
        return pred.max_length
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
        self.tok = copy.deepcopy(pred.tokenizer)  # the event loop's own: the worker uses pred's
        self.context = context_of(pred)
        self.log = FeedbackLog(cfg.feedback, pred.source)
        self.created = int(time.time())

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
            raise ApiError(
                429,
                f"the server is busy ({self.cfg.max_queue} requests waiting): retry shortly",
                "queue_full",
                "rate_limit_error",
            ) from None


def served(request: Request) -> Served:
    """The app's Served object (a FastAPI dependency)."""
    return request.app.state.served
