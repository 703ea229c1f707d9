"""The OpenAI-compatible HTTP app.

Routes: ``GET /`` (the chat page), ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``. Every error is answered in
the OpenAI shape (see :mod:`gguflm.server.errors`): 400 for a malformed or invalid body,
404/405 for unknown routes and methods, 413 for a body over ``max_body`` bytes, 503 when
the queue is full, 500 for a failure of the model; the server keeps serving after each.

Streams are server-sent events. A client that goes away is noticed at once (the app
listens for the disconnect while it computes an answer, streamed or not) and its request
is cancelled, which frees its KV-cache slot.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gguflm.engine.scheduler import Done, Failed, Piece
from gguflm.server.backend import Backend, Generation
from gguflm.server.errors import APIError
from gguflm.server.metrics import CONTENT_TYPE as METRICS_TYPE
from gguflm.server.metrics import render as render_metrics
from gguflm.engine.formats import SSE_DONE, ChatFormat, CompletionFormat, sse
from gguflm.server.schemas import ChatCompletionRequest, CompletionRequest, parse
from gguflm.server.security import Guard, Security

DEFAULT_MAX_BODY = 1 << 20   # bytes of a request body

log = logging.getLogger("gguflm.server")


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a body grows past the limit."""


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_body`` bytes, by its Content-Length or,
    without one, as it arrives."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(scope, receive, send, APIError(400, "invalid Content-Length header"))
                return
            if int(length) > self.max_body:
                await _send_error(scope, receive, send, _too_large(self.max_body))
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes",
                    "invalid_request_error", None, "request_too_large")


async def _send_error(scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
    await JSONResponse(err.body(), err.status)(scope, receive, send)


class CatchAll:
    """ASGI middleware: an unexpected exception is logged and answered with a JSON 500 (when
    the answer has not begun), and the connection stays open for the client's next request
    (Starlette's own handler re-raises, and uvicorn then closes the connection)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - the last line of defence: log, answer, serve on
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:  # else the answer is cut short, and uvicorn closes the connection
                err = APIError(500, f"internal error: {type(e).__name__}", "server_error")
                await _send_error(scope, receive, send, err)


class EventStream(StreamingResponse):
    """Server-sent events that stop (closing the body iterator, whose ``finally`` cancels
    the generation) as soon as the client disconnects, even while no event is due."""

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away mid-send
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def create_app(backend: Backend, max_body: int = DEFAULT_MAX_BODY, security: Security | None = None) -> FastAPI:
    """The app serving ``backend``'s model under ``security``'s access policy (None: no
    checks, for an app that is not exposed to any network)."""
    app = FastAPI(title="gguflm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_body=max_body)
    if security is not None:
        app.add_middleware(Guard, security=security)
    app.add_middleware(CatchAll)  # outermost of ours: whatever fails below is answered
    page = importlib.resources.files("gguflm.server").joinpath("static/index.html").read_text("utf-8")

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, e: BodyTooLarge) -> JSONResponse:
        err = _too_large(max_body)
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), e.status_code)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **backend.scheduler.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(backend.scheduler, backend.model_id), media_type=METRICS_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cfg = backend.model.config
        return {"object": "list", "data": [{
            "id": backend.model_id, "object": "model", "created": backend.created, "owned_by": "gguflm",
            "meta": {"n_ctx": backend.scheduler.n_ctx, "n_ctx_train": cfg.n_ctx_train, "n_vocab": cfg.n_vocab,
                     "n_slots": backend.scheduler.n_slots, "arch": cfg.arch}}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(request, backend, parse(ChatCompletionRequest, await request.body()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(request, backend, parse(CompletionRequest, await request.body()))

    return app


async def _answer(request: Request, backend: Backend, req: ChatCompletionRequest | CompletionRequest) -> Response:
    """Run a validated request; a JSON answer, or a stream of events."""
    chat = isinstance(req, ChatCompletionRequest)
    prompt = await asyncio.to_thread(backend.chat_prompt if chat else backend.completion_prompt, req)
    fmt = (ChatFormat if chat else CompletionFormat)(backend.model_id, backend.model.tokenizer, req.include_usage())
    job = backend.job(req, prompt)
    gen = backend.start(job)
    with_logprobs = job.top_logprobs is not None
    if req.stream:
        return EventStream(_stream(gen, fmt, with_logprobs))
    watcher = asyncio.create_task(_cancel_on_disconnect(request, gen))
    pieces: list[Piece] = []
    try:
        async for ev in gen.events():
            if isinstance(ev, Piece):
                pieces.append(ev)
            elif isinstance(ev, Done):
                return JSONResponse(fmt.response(pieces, ev, with_logprobs))
            elif watcher.done():
                return Response(status_code=499)  # the client left; nobody reads this
            else:
                raise APIError(500, ev.message, "server_error")
        raise AssertionError("events() ends with Done or Failed")
    finally:
        watcher.cancel()
        gen.cancel()


async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Cancel ``gen`` as soon as the client of ``request`` (body already read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.cancel()


async def _stream(gen: Generation, fmt: ChatFormat | CompletionFormat, with_logprobs: bool) -> AsyncIterator[bytes]:
    try:
        opening = fmt.opening()
        if opening is not None:
            yield sse(opening)
        async for ev in gen.events():
            if isinstance(ev, Piece):
                yield sse(fmt.chunk(ev, True)) if with_logprobs else fmt.text_event(ev.text)
            elif isinstance(ev, Done):   # the last events in one write
                yield sse(fmt.closing(ev)) + (sse(fmt.usage_chunk(ev)) if fmt.include_usage else b"") + SSE_DONE
            elif isinstance(ev, Failed):
                yield sse(APIError(500, ev.message, "server_error").body())
    finally:
        gen.cancel()
