"""The model's side of ``ftcli serve``: a bounded queue of jobs and the one worker thread that owns
the model, taking the oldest job and every waiting job that shares its adapter and settings (up to a
batch size) and running them as one batch, streaming each row back to its request's event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ftcli.serve.predictor import Predictor

BASE = object()  # the key of requests for the base model with every adapter switched off
log = logging.getLogger("ftcli.serve")


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
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names it in the server log

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
            except Exception:  # the model failed: the log says why, each job only where to look
                log.exception("request ids %s: the model failed", ", ".join(j.rid for j in jobs))
                for j in jobs:
                    j.emit("error", j.rid)

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
