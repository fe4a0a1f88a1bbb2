"""The routes of ``ftcli serve`` beyond OpenAI's API: GET /health, POST /v1/classify (labels with
probabilities) and POST /v1/feedback (verdicts that become training data)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from ftcli.errors import FtcliError
from ftcli.serve.api import ApiError, ClassifyBody, FeedbackBody
from ftcli.serve.batching import Job
from ftcli.serve.state import Served, served

router = APIRouter()
State = Annotated[Served, Depends(served)]


@router.get("/health")
async def health(s: State):
    return {
        "status": "ok",
        "task": s.pred.task,
        "models": list(s.ids),
        "queued": len(s.batcher.pending),
        **s.worker.stats,
    }


@router.post("/v1/classify")
async def classify(body: ClassifyBody, s: State):
    key = s.key_of(body.model)
    s.need("classification", "classify")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is empty", "invalid_input")
    for i, t in enumerate(texts):
        n = len(s.tok(t)["input_ids"])
        if n > s.context:
            raise ApiError(
                400,
                f"input {i} is {n} tokens; this classifier reads at most {s.context} "
                "(the data.max_length it was trained with): shorten it",
                "context_length_exceeded",
            )
    jobs = [Job((key, "classify"), t) for t in texts]
    await s.submit(jobs)
    out = []
    for i, j in enumerate(jobs):
        ev = await j.events.get()
        if ev[0] == "error":
            raise ApiError(500, f"classification failed: {ev[1]}", "internal_error", "server_error")
        out.append({"index": i, **ev[1]})
    return {"object": "list", "model": body.model, "data": out}


def _write_feedback(s: Served, body: FeedbackBody, adapter: str | None) -> None:
    """One verdict to the feedback log, in the row layout of the served task."""
    if s.pred.task == "classification":
        if body.text is None or body.predicted is None:
            raise ApiError(
                400, "classification feedback needs text and predicted", "invalid_feedback"
            )
        labels = s.pred.labels.get(adapter) or s.pred.labels.get(None) or []
        s.log.classification(body.text, body.predicted, body.verdict, labels, body.correct, adapter)
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
    s.log.chat(ctx, body.answer, body.verdict, body.correct, adapter)


@router.post("/v1/feedback")
async def feedback(body: FeedbackBody, s: State):
    key = s.key_of(body.model)
    try:
        _write_feedback(s, body, key if isinstance(key, str) else None)
    except FtcliError as exc:
        raise ApiError(400, exc.render(), "invalid_feedback") from None
    path = s.log.rejected_path if body.verdict == "bad" else s.log.path
    return {"ok": True, "verdict": body.verdict, "file": str(path)}
