"""The prediction server: `mlops serve`, or `uvicorn --factory serving.app:create_app`."""

from __future__ import annotations

import asyncio
import gc
import hmac
import inspect
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from pipeline.config import Settings, get_settings
from pipeline.registry import RegistryError
from pipeline.store import PredictionStore, StoreUnavailable, encode_rows
from serving import metrics
from serving.requests import (
    BadRequest,
    expect_object,
    parse_ids,
    parse_invocations,
    parse_json,
    parse_labels,
    rows_to_array,
)
from serving.runtime import LogWriter, MicroBatcher, ModelManager, NoModel

log = logging.getLogger(__name__)

JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}
PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "additionalProperties": False,
                    "properties": {
                        "instances": {
                            "type": "array",
                            "items": {"type": "array", "items": {"type": "number"}},
                        },
                        "ids": {"type": "array", "items": {"type": "string"}},
                    },
                }
            }
        },
    }
}
FEEDBACK_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["labels"],
                    "additionalProperties": False,
                    "properties": {
                        "labels": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "label": {"type": "integer"},
                                },
                            },
                        },
                        "overwrite": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error(status: int, detail: str, **extra: Any) -> Response:
    return json_response({"detail": detail, **extra}, status)


class State:
    """Everything the routes need, built once per server process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = ModelManager(settings)
        self.batcher = MicroBatcher(
            self.manager, settings.batch_max_rows, settings.batch_max_wait_ms / 1000
        )
        self.store = PredictionStore(settings.prediction_db)
        self.writer = LogWriter(self.store, settings.log_queue_max)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        from pipeline.tracking import configure_tracking

        threads = settings.torch_threads or max(1, (os.cpu_count() or 2) - 1)
        torch.set_num_threads(threads)
        # The event loop, the inference thread and the log writer hand the GIL to each other
        # on every request; the default 5 ms switch interval would add that much to each wait.
        sys.setswitchinterval(0.0005)
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
            log.warning("no model loaded at start-up: %s", exc)
        state.manager.start_polling()
        gc.collect()
        gc.freeze()  # start-up objects (MLflow, torch) leave the GC's scans: no long pauses
        try:
            yield
        finally:
            state.manager.stop()
            await state.batcher.stop()
            await state.writer.close()  # drain: nothing acknowledged is lost
            state.store.dispose()

    app = FastAPI(
        title="mlops-loop prediction server", version="1", lifespan=lifespan, **_telemetry(settings)
    )
    known: set[str] = set()  # filled below, once the routes exist
    app.add_middleware(GuardMiddleware, max_body=settings.max_body_bytes, known=known)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> Response:
        return error(
            422, "invalid request", errors=orjson.loads(orjson.dumps(exc.errors(), default=str))
        )

    @app.exception_handler(BadRequest)
    async def on_bad_request(_request: Request, exc: BadRequest) -> Response:
        return error(exc.status, exc.detail, **exc.extra)

    @app.exception_handler(StoreUnavailable)
    async def on_store_down(_request: Request, exc: StoreUnavailable) -> Response:
        return error(503, f"prediction store unavailable, nothing was logged: {exc}")

    router = _routes(settings)
    app.include_router(router)
    known.update(route.path for route in router.routes)  # metrics label by route, bounded
    return app


async def get_state(request: Request) -> State:
    # async on purpose: FastAPI runs plain-`def` dependencies in a thread pool, one hop per
    # request that the event loop would pay for.
    return request.app.state.mlops


StateDep = Annotated[State, Depends(get_state)]


async def _require_api_key(request: Request) -> None:
    key = request.app.state.mlops.settings.api_key
    if key is None:
        return
    sent = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(sent.encode(), key.get_secret_value().encode()):
        raise BadRequest(401, "missing or wrong X-API-Key")


async def _require_admin(request: Request) -> None:
    token = request.app.state.mlops.settings.admin_token
    if token is None:
        raise BadRequest(403, "admin routes are disabled: set MLOPS_ADMIN_TOKEN to enable them")
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        sent.encode(), token.get_secret_value().encode()
    ):
        raise BadRequest(401, "missing or wrong bearer token")


def _routes(settings: Settings):
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/health", tags=["ops"])
    async def health() -> Response:
        """The process is up."""
        return json_response({"status": "ok"})

    @router.get("/ready", tags=["ops"])
    async def ready(state: StateDep) -> Response:
        """A model is loaded and requests can be served."""
        model = state.manager.current
        if model is None:
            return json_response(
                {"ready": False, "detail": state.manager.last_error or "no model loaded"}, 503
            )
        return json_response({"ready": True, "model_version": model.version})

    @router.get("/model", tags=["ops"])
    async def model_info(state: StateDep) -> Response:
        """Name, version, run, data version and load time of the serving model."""
        model = state.manager.current
        body = model.info() if model else {"model_name": settings.model_name, "model_version": None}
        body["last_load_error"] = state.manager.last_error
        body["log_mode"] = settings.log_mode
        return json_response(body)

    @router.get("/metrics", tags=["ops"])
    async def prometheus(state: StateDep) -> Response:
        """Prometheus metrics."""
        try:
            score = await asyncio.to_thread(state.store.latest_drift)
            if score is not None:
                metrics.DRIFT.set(score)
        except Exception:  # noqa: BLE001 - metrics must answer even when the store is down
            pass
        content, media = metrics.render()
        return Response(content, media_type=media)

    @router.post(
        "/predict",
        tags=["predict"],
        openapi_extra=PREDICT_DOC,
        dependencies=[Depends(_require_api_key)],
    )
    async def predict(request: Request, state: StateDep) -> Response:
        """Predict rows of raw features; every row is logged under its id."""

        def parse(body: bytes, content_type: str | None, model) -> tuple[np.ndarray, list[str]]:
            payload = expect_object(
                parse_json(body, content_type), {"instances", "ids"}, {"instances"}
            )
            rows = rows_to_array(
                payload["instances"], model.predictor.cfg.n_features, settings.max_rows_per_request
            )
            return rows, parse_ids(payload.get("ids"), len(rows))

        ids, labels, prob_lists, used = await _serve_rows(state, request, parse)
        body = {
            "model_name": used.name,
            "model_version": used.version,
            "predictions": [
                {"id": i, "label": lbl, "probabilities": p}
                for i, lbl, p in zip(ids, labels, prob_lists, strict=True)
            ],
        }
        return json_response(body, headers={"X-Model-Version": used.version})

    @router.post(
        "/invocations",
        tags=["predict"],
        openapi_extra=JSON_BODY,
        dependencies=[Depends(_require_api_key)],
    )
    async def invocations(request: Request, state: StateDep) -> Response:
        """MLflow's scoring protocol, answered in MLflow's shape; rows are logged too."""

        def parse(body: bytes, content_type: str | None, model) -> tuple[np.ndarray, list[str]]:
            rows = parse_invocations(
                parse_json(body, content_type),
                model.predictor.feature_names,
                settings.max_rows_per_request,
            )
            return rows, parse_ids(None, len(rows))

        _, labels, prob_lists, used = await _serve_rows(state, request, parse)
        records = [
            {"label": lbl, **{f"prob_{k}": v for k, v in enumerate(p)}}
            for lbl, p in zip(labels, prob_lists, strict=True)
        ]
        return json_response({"predictions": records}, headers={"X-Model-Version": used.version})

    @router.post(
        "/feedback",
        tags=["feedback"],
        openapi_extra=FEEDBACK_DOC,
        dependencies=[Depends(_require_api_key)],
    )
    async def feedback(request: Request, state: StateDep) -> Response:
        """Ground-truth labels for logged predictions, joined by id."""
        model = state.manager.current
        payload = parse_json(await request.body(), request.headers.get("content-type"))
        valid, errors, overwrite = parse_labels(
            payload,
            settings.max_rows_per_request,
            model.predictor.cfg.num_classes if model else None,
        )
        outcomes = (
            await asyncio.to_thread(state.store.add_labels, valid, overwrite) if valid else []
        )
        results = [{"id": o.id, "status": o.status, "detail": o.detail} for o in outcomes]
        results += errors
        counts: dict[str, int] = {}
        for r in results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        if counts.get("conflict"):
            return json_response(
                {
                    "detail": "some ids already carry a different label; nothing "
                    "was applied (send overwrite=true to replace them)",
                    "results": results,
                    "counts": counts,
                },
                409,
            )
        return json_response({"results": results, "counts": counts})

    @router.post("/admin/reload", tags=["admin"], dependencies=[Depends(_require_admin)])
    async def reload(state: StateDep, version: str | None = None) -> Response:
        """Load the configured alias now (or ?version=N); the old model serves until then."""
        current = state.manager.current
        try:
            changed = await asyncio.to_thread(state.manager.refresh, version)
        except (LookupError, RegistryError) as exc:  # no such version or alias
            return error(404, f"{exc}; still serving v{current.version if current else '-'}")
        except Exception as exc:  # noqa: BLE001 - reported, old model keeps serving
            current = state.manager.current
            return error(
                503,
                f"reload failed, still serving v{current.version if current else 'nothing'}: {exc}",
            )
        model = state.manager.current
        return json_response({"changed": changed, **(model.info() if model else {})})

    return router


async def _serve_rows(state: State, request: Request, parse):
    """Parse (counted as arriving, for the micro-batcher), infer, log; returns
    (ids, labels, probability lists, the model that answered)."""
    start = time.perf_counter()
    state.batcher.arriving += 1
    try:
        model = _model_or_503(state)
        rows, ids = parse(await request.body(), request.headers.get("content-type"), model)
    finally:
        state.batcher.arriving -= 1
    probs, used = await _infer(state, rows)
    labels = probs.argmax(axis=1).tolist()
    await _log(state, ids, rows, labels, probs, used, start)
    return ids, labels, probs.tolist(), used


def _model_or_503(state: State):
    model = state.manager.current
    if model is None:
        raise BadRequest(
            503, f"no model loaded ({state.manager.last_error or 'starting'}); see /ready"
        )
    return model


async def _infer(state: State, rows: np.ndarray):
    try:
        return await state.batcher.predict(rows)
    except NoModel as exc:
        raise BadRequest(503, str(exc)) from None
    except ValueError as exc:  # a model swap changed the expected width mid-flight
        raise BadRequest(422, str(exc)) from None


async def _log(
    state: State,
    ids: list[str],
    rows: np.ndarray,
    labels: list[int],
    probs: np.ndarray,
    used,
    start: float,
) -> None:
    if state.settings.log_mode == "off":
        return
    latency_ms = (time.perf_counter() - start) * 1000
    now = time.time()
    log_rows = [  # tuples in PredictionStore.COLUMNS order
        (i, now, used.name, used.version, f, lbl, p, latency_ms)
        for i, f, lbl, p in zip(ids, encode_rows(rows), labels, encode_rows(probs), strict=True)
    ]
    future = state.writer.submit(log_rows, wait=state.settings.log_mode == "durable")
    if future is not None:
        await future  # durable: answer only once the rows are committed


def _telemetry(settings: Settings) -> dict:
    """FastAPI's own OpenTelemetry hooks (0.150 has them; an older FastAPI may not) stay off
    the request path unless MLOPS_OTEL asks for them: even with no OTel SDK configured,
    their per-request check costs ~2% of 1-row throughput."""
    if settings.otel or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans")
    return {"telemetry": dict.fromkeys(off, False)}


class GuardMiddleware:
    """Pure ASGI: body-size limit (413) and per-route request metrics, before any parsing."""

    def __init__(self, app, max_body: int, known: set[str]) -> None:
        self.app, self.max_body, self.known = app, max_body, known  # known: the app's paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.known else "other"
        start = time.perf_counter()
        status_holder = {"status": 500}
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = False
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                too_big = False
        if too_big:
            await _send_json(send, 413, {"detail": f"body larger than {self.max_body} bytes"})
            status_holder["status"] = 413
        else:
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BadRequest(413, f"body larger than {self.max_body} bytes")
                return message

            async def tracking_send(message):
                if message["type"] == "http.response.start":
                    status_holder["status"] = message["status"]
                await send(message)

            try:
                await self.app(scope, limited_receive, tracking_send)
            except BadRequest as exc:
                status_holder["status"] = exc.status
                await _send_json(send, exc.status, {"detail": exc.detail})
        status = str(status_holder["status"])
        metrics.REQUESTS.labels(route, status).inc()
        metrics.LATENCY.labels(route, status).observe(time.perf_counter() - start)


async def _send_json(send, status: int, body: dict) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
