"""The prediction server: `mlops serve`, or `uvicorn --factory serving.app:create_app`.

This module assembles the app: the lifespan (start-up and drain), the error handlers, the
middleware and the routers of `serving.routes`.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import sys
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import Settings, get_settings
from pipeline.redact import install as install_redaction
from pipeline.redact import redact
from pipeline.store import StoreUnavailable
from pipeline.tracking import configure_tracking
from serving.deps import State
from serving.middleware import GuardMiddleware
from serving.requests import BadRequest
from serving.responses import error, error_body, is_v2, json_response, store_unavailable
from serving.routes import ROUTERS
from serving.schemas import request_schemas

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # /docs and /redoc from assets installed with the package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="mlops-loop prediction server",
        version="1",
        lifespan=_lifespan(settings),
        **telemetry_options(settings),
    )
    known: set[str] = set()  # filled below, once the routes exist
    _guard_first(
        app,
        max_body=settings.max_body_bytes,
        known=known,
        fast=settings.fast_path and not settings.otel,  # OTel spans need FastAPI's routes
    )
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(BadRequest, _on_bad_request)
    app.add_exception_handler(StoreUnavailable, _on_store_down)
    for router in ROUTERS:
        app.include_router(router)
        known.update(route.path for route in router.routes)  # metrics label by route, bounded
    _document_request_bodies(app)
    return app


def _guard_first(app: FastAPI, **options) -> None:
    """`GuardMiddleware` in front of the whole stack FastAPI builds, not inside its error
    and telemetry middleware: the hot routes then skip two more layers per request (about
    5% of a 1-row request's time on the event loop). Everything else still passes through
    them; the error handlers (`ExceptionMiddleware`) stay inside, where they were."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: GuardMiddleware(build(), **options)  # type: ignore[method-assign]


def _lifespan(settings: Settings):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        # In every worker (uvicorn's log config is in place by now): no password in a log line.
        install_redaction("uvicorn", "uvicorn.error", "uvicorn.access")

        threads = settings.torch_threads or max(1, (os.cpu_count() or 2) - 1)
        torch.set_num_threads(threads)
        # The event loop, the inference thread and the log writer hand the GIL to each other
        # on every request, and the inference thread wants it back after every layer of a
        # forward pass: each time the loop holds it, that thread waits up to the switch
        # interval (default 5 ms). 0.5 ms -> 0.1 ms: 64-row requests at concurrency 8
        # +7% and +13% req/s in two interleaved runs; 0.03 ms measured no better.
        sys.setswitchinterval(0.0001)
        state = State(settings)
        app.state.mlops = state
        try:
            await asyncio.to_thread(state.store.create)
            state.writer.schema_ready = True
        except StoreUnavailable as exc:  # serve anyway: /predict answers 503 until it is back
            log.error("%s", exc)
        state.writer.start()
        state.batcher.start()
        try:
            await asyncio.to_thread(configure_tracking, settings)
            await asyncio.to_thread(state.manager.refresh)
        except Exception as exc:  # noqa: BLE001 - the server starts; /ready says why not
            state.manager.last_error = redact(f"no model loaded at start-up: {exc}")
            log.warning("%s", state.manager.last_error)
        state.manager.start_polling()
        state.side.start()
        state.canary.start()
        if state.shadow is not None:
            state.shadow.start()
        gc.collect()
        gc.freeze()  # start-up objects (MLflow, torch) leave the GC's scans: no long pauses
        try:
            yield
        finally:
            state.manager.stop()
            if state.shadow is not None:
                await asyncio.to_thread(state.shadow.stop)
            await state.canary.stop()
            await state.batcher.stop()
            await state.writer.close()  # drain: nothing acknowledged is lost
            await asyncio.to_thread(state.side.close)
            state.store.dispose()

    return lifespan


def telemetry_options(settings: Settings) -> dict:
    """The keyword arguments `create_app` gives FastAPI for its own OpenTelemetry hooks.

    FastAPI's hooks (0.150 has them; an older FastAPI may not) stay off the request path
    unless MLOPS_OTEL asks for them: even with no OTel SDK configured, their per-request
    check costs ~2% of 1-row throughput."""
    if settings.otel or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans")
    return {"telemetry": dict.fromkeys(off, False)}


def _document_request_bodies(app: FastAPI) -> None:
    """The routes read their own bodies (see serving.routes.predict), so FastAPI does not
    see the request models: add them to the generated document's components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()  # cached by FastAPI as app.openapi_schema
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
        _examples(app, app.openapi_schema)
        return app.openapi_schema

    app.openapi = openapi


def _examples(app: FastAPI, schema: dict) -> None:
    """Request examples that the serving model accepts as they are ("Try it out" in /docs):
    one row of its width, at its training data's mean; a label in its classes."""
    state = getattr(app.state, "mlops", None)
    model = state.manager.current if state is not None else None
    if model is None:
        return
    pre = model.predictor.preprocessor
    row = [round(float(v), 2) for v in pre.mean]
    bodies = {
        "/predict": {"instances": [row], "ids": ["example-1"]},
        "/invocations": {"instances": [row]},
        "/feedback": {"labels": [{"id": "example-1", "label": 0}]},
    }
    for path, example in bodies.items():
        operation = schema.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            content = operation["requestBody"]["content"]["application/json"]
            content["example"] = example


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The framework's own refusals (no such route, a method the route does not take):
    under /v2 in the Open Inference Protocol's error shape, as every other /v2 refusal
    (tritonclient reads `error`); elsewhere FastAPI's `{"detail": ...}`."""
    if is_v2(request.url.path):
        body = error_body(str(exc.detail), v2=True)
        return json_response(body, exc.status_code, headers=getattr(exc, "headers", None))
    return await http_exception_handler(request, exc)


async def _on_validation(_request: Request, exc: RequestValidationError) -> Response:
    return error(
        422, "invalid request", errors=orjson.loads(orjson.dumps(exc.errors(), default=str))
    )


async def _on_bad_request(_request: Request, exc: BadRequest) -> Response:
    return error(exc.status, exc.detail, **exc.extra)


async def _on_store_down(request: Request, exc: StoreUnavailable) -> Response:
    return store_unavailable(exc, path=request.url.path)
