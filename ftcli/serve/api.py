"""The wire format of ``ftcli serve``: the request bodies it accepts and OpenAI's JSON error body
for everything it refuses, installed as the app's exception handlers so no traceback reaches a
client."""

from __future__ import annotations

import logging
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ftcli.serve")


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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def as_dict(self) -> dict:
        """The message as a chat template reads it (developer is the system role)."""
        d = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for k in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

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

    def check_supported(self, tools_rendered: bool = False) -> None:
        """400 for what this server does not do; ``tools_rendered``: the model's chat template
        writes tools into the prompt, so a chat request may give them."""
        if self.n != 1:
            raise ApiError(400, "n must be 1: one answer per request", "unsupported_parameter")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", "unsupported_parameter")
        if self.tools and not tools_rendered:
            raise ApiError(
                400,
                "tools are not supported here: this model's chat template does not render them "
                "(train with a data.chat_template that does, e.g. qwen)",
                "unsupported_parameter",
            )

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


async def _api_error(request, exc: ApiError):
    return error_body(exc.status, exc.message, exc.code, exc.type)


async def _invalid(request, exc: RequestValidationError):
    return error_body(400, _first_error(exc), "invalid_request")


async def _http(request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_body(exc.status_code, str(exc.detail), code)


def internal_error(rid: str, what: str = "the request") -> ApiError:
    """A 500 that names the server log's entry but none of what it says (paths, data)."""
    return ApiError(
        500,
        f"{what} failed on the server (request id {rid}); the server's log has the details",
        "internal_error",
        "server_error",
    )


async def _crash(
    request, exc: Exception
):  # never a traceback, nor the exception's text, on the wire
    rid = uuid.uuid4().hex[:12]
    log.error(
        "request id %s: %s %s failed: %s: %s",
        rid,
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    err = internal_error(rid)
    return error_body(err.status, err.message, err.code, err.type)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure of ``app`` answered as OpenAI's JSON error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)


def usage_of(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
