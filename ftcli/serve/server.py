"""``ftcli serve``: a Predictor behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

One worker thread owns the model (``batching``). Requests wait in a bounded queue; the worker takes
the oldest and every waiting request that shares its adapter and settings (up to a batch size),
switches the adapter once and runs them as one batch. Tokens go back through asyncio queues, so the
worker never waits on a client socket: a slow or vanished client holds only its own connection. The
routes (``openai_routes``, ``ftcli_routes``) read what they share from ``app.state.served``.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ftcli.errors import FtcliError
from ftcli.serve import ftcli_routes, openai_routes
from ftcli.serve.api import error_body, install_error_handlers
from ftcli.serve.predictor import Predictor
from ftcli.serve.state import ServeConfig, Served, model_ids

__all__ = ["ServeConfig", "create_app", "serve"]


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


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The model worker runs while the app does."""
    served = app.state.served
    served.worker.start()
    yield
    served.batcher.close()


def create_app(pred: Predictor, cfg: ServeConfig) -> _Guard:
    """The FastAPI app over one loaded Predictor (behind the key and body-size guard); the model
    worker starts with the app."""
    app = FastAPI(title="ftcli serve", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.served = Served(pred, cfg)
    app.state.worker = app.state.served.worker
    install_error_handlers(app)
    app.include_router(ftcli_routes.router)
    app.include_router(openai_routes.router)
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
