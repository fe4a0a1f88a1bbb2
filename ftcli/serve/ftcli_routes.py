"""The routes of ``ftcli serve`` beyond OpenAI's API: GET /health, POST /v1/classify (labels with
probabilities) and POST /v1/feedback (verdicts that become training data)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ftcli.errors import FtcliError
from ftcli.serve.api import ApiError, ClassifyBody, FeedbackBody, internal_error
from ftcli.serve.batching import Job
from ftcli.serve.feedback import FeedbackLog
from ftcli.serve.state import Served, served

router = APIRouter()
State = Annotated[Served, Depends(served)]


@router.get("/health")
async def health(request: Request, s: State):
    if not s.authorized(request):  # with a key set, a caller without it learns only that it is up
        return {"status": "ok"}
    return {
        "status": "ok",
        "task": s.pred.task,
        "models": list(s.ids),
        "queued": len(s.batcher.pending),
        **s.worker.stats,
    }


def token_counts(tok, texts: list[str]) -> list[int]:
    """Each text's length in tokens; runs on the tokenizer thread."""
    return [len(tok(t)["input_ids"]) for t in texts]


async def classified(jobs: list[Job]) -> list[dict]:
    """Each job's labels and probabilities, in order."""
    out = []
    for i, j in enumerate(jobs):
        ev = await j.events.get()
        if ev[0] == "error":
            raise internal_error(ev[1], "classification")
        out.append({"index": i, **ev[1]})
    return out


@router.post("/v1/classify")
async def classify(body: ClassifyBody, request: Request, s: State):
    deadline = s.deadline()
    key = s.key_of(body.model)
    s.need("classification", "classify")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is empty", "invalid_input")
    s.check_prompts(texts, "input")
    s.check_room(len(texts))
    counts = await s.within(deadline, s.off_loop(token_counts, s.tok, texts))
    for i, n in enumerate(counts):
        if n > s.context:
            raise ApiError(
                400,
                f"input {i} is {n} tokens; this classifier reads at most {s.context} "
                "(the data.max_length it was trained with): shorten it",
                "context_length_exceeded",
            )
    jobs = [Job((key, "classify"), t) for t in texts]
    await s.submit(jobs)
    out = await s.answer(request, jobs, classified(jobs), deadline)
    return {"object": "list", "model": body.model, "data": out}


def _write_feedback(s: Served, log: FeedbackLog, body: FeedbackBody, adapter: str | None) -> None:
    """One verdict to the feedback log, in the row layout of the served task."""
    if s.pred.task == "classification":
        if body.text is None or body.predicted is None:
            raise ApiError(
                400, "classification feedback needs text and predicted", "invalid_feedback"
            )
        labels = s.pred.labels.get(adapter) or s.pred.labels.get(None) or []
        log.classification(body.text, body.predicted, body.verdict, labels, body.correct, adapter)
        return
    if body.messages is None or body.answer is None:
        raise ApiError(
            400,
            "chat feedback needs messages (the conversation before the answer) and answer",
            "invalid_feedback",
        )
    if body.verdict == "fixed" and not body.correct:
        raise ApiError(400, "a fixed verdict needs correct (the right answer)", "invalid_feedback")
    ctx = [{"role": m.role, "content": m.text()} for m in body.messages]
    log.chat(ctx, body.answer, body.verdict, body.correct, adapter)


@router.post("/v1/feedback")
async def feedback(body: FeedbackBody, s: State):
    log = s.feedback_log()
    key = s.key_of(body.model)
    try:
        _write_feedback(s, log, body, key if isinstance(key, str) else None)
    except FtcliError as exc:
        raise ApiError(400, exc.render(), "invalid_feedback") from None
    s.feedback_rows += 1
    path = log.rejected_path if body.verdict == "bad" else log.path
    return {"ok": True, "verdict": body.verdict, "file": str(path)}
