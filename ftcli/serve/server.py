"""``ftcli serve``: a Predictor behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

One worker thread owns the model (``batching``). Requests wait in a bounded queue; the worker takes
the oldest and every waiting request that shares its adapter and settings (up to a batch size),
switches the adapter once and runs them as one batch. Tokens go back through asyncio queues, so the
worker never waits on a client socket: a slow or vanished client holds only its own connection. The
routes (``openai_routes``, ``ftcli_routes``) read what they share from ``app.state.served``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ftcli.errors import FtcliError
from ftcli.serve import ftcli_routes, openai_routes
from ftcli.serve.api import error_body, install_error_handlers
from ftcli.serve.predictor import Predictor
from ftcli.serve.state import ServeConfig, Served, allowed_hosts, key_ok, model_ids

__all__ = ["ServeConfig", "create_app", "serve"]


class _Guard:
    """ASGI middleware, before the app reads a byte of the body: the Host allow-list (on
    loopback), the bearer key on everything but /health (constant-time compare) and a body-size
    limit."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.api_key, self.max_body = app, cfg.api_key, cfg.max_body_bytes
        self.port, self.hosts = cfg.port, allowed_hosts(cfg.host, cfg.port)

    def refusal(self, path: str, headers: dict[bytes, bytes]):
        """The error response for a request from a foreign Host or without the key, or None."""
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.hosts is not None and host and host not in self.hosts:
            return error_body(
                403,
                f"this server answers only requests to localhost, 127.0.0.1 or [::1] on port "
                f"{self.port}, not to {host!r} (a web page reaching it by DNS rebinding); to "
                "serve other names, listen on them with --host (and set --api-key)",
                "host_not_allowed",
            )
        if not self.api_key or path == "/health":
            return None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if key_ok(auth, self.api_key):
            return None
        msg = "missing API key" if not auth else "incorrect API key"
        return error_body(
            401,
            f"{msg}: send 'Authorization: Bearer <key>' (the server's --api-key)",
            "invalid_api_key",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refused = self.refusal(scope["path"], headers)
        if refused is not None:
            return await refused(scope, receive, send)
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
    served.tokenizer_thread.shutdown(wait=False)


def create_app(pred: Predictor, cfg: ServeConfig) -> _Guard:
    """The FastAPI app over one loaded Predictor (behind the key and body-size guard); the model
    worker starts with the app."""
    app = FastAPI(title="ftcli serve", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.served = Served(pred, cfg)
    app.state.worker = app.state.served.worker
    install_error_handlers(app)
    app.include_router(ftcli_routes.router)
    app.include_router(openai_routes.router)
    return _Guard(app, cfg)


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
    if cfg.feedback:
        say(f"POST /v1/feedback appends to {cfg.feedback} (at most {cfg.feedback_max_rows:,} rows)")
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
