"""The OpenAI-compatible routes of ``ftcli serve``: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (streamed as server-sent events or answered whole)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ftcli.data.chat import render_chat, renders_tools
from ftcli.serve.api import (
    ApiError,
    ChatBody,
    CompletionBody,
    _Sampling,
    internal_error,
    usage_of,
)
from ftcli.serve.batching import BASE, Job
from ftcli.serve.state import Served, served

router = APIRouter()
State = Annotated[Served, Depends(served)]


def limits(
    s: Served, body: _Sampling, tools_rendered: bool = False
) -> tuple[tuple[str, ...], int | None]:
    """The request's stop strings and asked max_tokens; 400 for unsupported settings or
    max_tokens above the server's."""
    body.check_supported(tools_rendered)
    stops = body.stops()
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > s.cfg.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {asked}; this server answers with at most {s.cfg.max_tokens} "
            "(its --max-tokens)",
            "max_tokens_too_large",
        )
    return stops, asked


def encode(tok, prompts: list[str], special: bool) -> list[list[int]]:
    """Each prompt's token ids (one token, BOS or EOS, for an empty one); runs on the tokenizer
    thread."""
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=special)["input_ids"] if p else []
        out.append(ids or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id])
    return out


def encode_chat(tok, msgs: list[dict], tools: list | None = None) -> list[int]:
    """A conversation (and the tools it may call) rendered by the chat template and tokenized;
    runs on the tokenizer thread."""
    try:
        prompt = render_chat(tok, msgs, add_generation_prompt=True, tools=tools)
    except Exception as exc:  # a template that refuses this conversation (roles, order)
        raise ApiError(
            400, f"the chat template refused the messages: {exc}", "invalid_messages"
        ) from None
    return encode(tok, [prompt], not getattr(tok, "chat_template", None))[0]


def generation_jobs(s: Served, body: _Sampling, encoded: list[list[int]], key) -> list[Job]:
    """One job per tokenized prompt; 400 for a prompt with no room left in the model's context
    for an answer."""
    stops, asked = limits(s, body, tools_rendered=True)  # tools: the route checked them
    context = s.context
    jobs = []
    for ids_ in encoded:
        room = context - len(ids_)
        want = asked if asked is not None else min(s.cfg.max_tokens, room)
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
    """A job's whole answer: (text, finish reason, prompt tokens, completion tokens)."""
    parts = []
    while True:
        ev = await job.events.get()
        if ev[0] == "delta":
            parts.append(ev[1])
        elif ev[0] == "done":
            return "".join(parts), ev[1], ev[2], ev[3]
        elif ev[0] == "error":
            raise internal_error(ev[1], "generation")


async def collect_all(jobs: list[Job]) -> list[tuple[str, str, int, int]]:
    return [await collect(j) for j in jobs]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream(
    s: Served, job: Job, chunk: Callable[..., dict | None], usage: bool, deadline: float
) -> StreamingResponse:
    """A job's answer as server-sent events, one ``chunk`` per delta, cut by an error event at
    the request's deadline; a client that leaves cancels its row."""

    async def events():
        try:
            first = chunk(None, None)
            if first:
                yield _sse(first)
            while True:
                try:
                    ev = await s.within(deadline, job.events.get())
                except ApiError as exc:  # the deadline passed: say so in the stream
                    ev = ("error", exc)
                if ev[0] == "delta":
                    yield _sse(chunk(ev[1], None))
                elif ev[0] == "done":
                    yield _sse(chunk(None, ev[1]))
                    if usage:
                        yield _sse(chunk(None, None, usage=(ev[2], ev[3])) or {})
                    break
                else:
                    err = (
                        ev[1]
                        if isinstance(ev[1], ApiError)
                        else internal_error(ev[1], "generation")
                    )
                    yield _sse(
                        {"error": {"message": err.message, "type": err.type, "code": err.code}}
                    )
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that left stops its row at the next token

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def chat_chunk(rid: str, now: int, model: str, delta, finish, usage=None) -> dict:
    """One chat.completion.chunk: the opening one (role) when neither delta nor finish is given."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model}
    if usage:
        return {**base, "choices": [], "usage": usage_of(*usage)}
    d = (
        {"role": "assistant", "content": ""}
        if delta is None and finish is None
        else ({"content": delta} if delta is not None else {})
    )
    return {
        **base,
        "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}],
    }


def completion_chunk(rid: str, now: int, model: str, delta, finish, usage=None) -> dict | None:
    """One streamed text_completion; none to open the stream."""
    base = {"id": rid, "object": "text_completion", "created": now, "model": model}
    if usage:
        return {**base, "choices": [], "usage": usage_of(*usage)}
    if delta is None and finish is None:
        return None
    return {
        **base,
        "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}],
    }


@router.get("/v1/models")
async def models(s: State):
    return {
        "object": "list",
        "data": [
            {
                "id": m,
                "object": "model",
                "created": s.created,
                "owned_by": "ftcli",
                "task": s.pred.task,
                "adapter": k is not None and k is not BASE,
            }
            for m, k in s.ids.items()
        ],
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, s: State):
    deadline = s.deadline()
    key = s.key_of(body.model)
    s.need("causal_lm", "chat")
    msgs = [m.as_dict() for m in body.messages]
    limits(s, body, tools_rendered=bool(body.tools) and renders_tools(s.tok))
    s.check_prompts(["".join(m["content"] for m in msgs)], "conversation")
    s.check_room(1)
    encoded = await s.within(deadline, s.off_loop(encode_chat, s.tok, msgs, body.tools))
    (job,) = generation_jobs(s, body, [encoded], key)
    await s.submit([job])
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        chunk = partial(chat_chunk, rid, now, body.model)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return stream(s, job, chunk, usage, deadline)
    text, finish, p, c = await s.answer(request, [job], collect(job), deadline)
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


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, s: State):
    deadline = s.deadline()
    key = s.key_of(body.model)
    s.need("causal_lm", "completions")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a list of strings", "invalid_prompt")
    if body.stream and len(prompts) != 1:
        raise ApiError(400, "streaming takes one prompt", "unsupported_parameter")
    limits(s, body)
    s.check_prompts(prompts)
    s.check_room(len(prompts))
    encoded = await s.within(deadline, s.off_loop(encode, s.tok, prompts, True))
    jobs = generation_jobs(s, body, encoded, key)
    await s.submit(jobs)
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        chunk = partial(completion_chunk, rid, now, body.model)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return stream(s, jobs[0], chunk, usage, deadline)
    results = await s.answer(request, jobs, collect_all(jobs), deadline)
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
