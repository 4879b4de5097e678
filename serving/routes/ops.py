"""Operations: liveness, readiness, the serving model, Prometheus metrics."""

from __future__ import annotations

import asyncio
from importlib.metadata import version as _installed

from fastapi import APIRouter
from fastapi.responses import Response

from serving import metrics
from serving.deps import StateDep
from serving.responses import json_response
from serving.schemas import Health, ModelInfo, Readiness, responses

router = APIRouter(tags=["ops"])
MLFLOW_VERSION = _installed("mlflow")


@router.get("/", include_in_schema=False)
async def index(state: StateDep) -> Response:
    """Where to go from the server's root."""
    model = state.manager.current
    return json_response(
        {
            "service": "mlops-loop prediction server",
            "model": state.settings.model_name,
            "model_version": model.version if model else None,
            "links": {
                "docs": "/docs",
                "openapi": "/openapi.json",
                "health": "/health",
                "ready": "/ready",
                "model": "/model",
                "metrics": "/metrics",
                "predict": "POST /predict",
                "invocations": "POST /invocations (MLflow's scoring protocol; /ping, /version)",
                "feedback": "POST /feedback",
            },
        }
    )


@router.get("/health", responses=responses(Health))
async def health() -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


@router.get("/ping", responses={200: {"content": {"text/plain": {}}}, 503: {"model": Readiness}})
async def ping(state: StateDep) -> Response:
    """MLflow's scoring-server probe (what `ScoringServerClient.wait_server_ready` polls):
    200 once a model is loaded."""
    if state.manager.current is None:
        return json_response({"ready": False, "detail": state.manager.last_error}, 503)
    return Response("\n", media_type="text/plain")


@router.get("/version", responses={200: {"content": {"text/plain": {}}}})
async def version() -> Response:
    """The version of MLflow whose scoring protocol this server speaks (as MLflow's does)."""
    return Response(MLFLOW_VERSION, media_type="text/plain")


@router.get("/ready", responses=responses(Readiness) | {503: {"model": Readiness}})
async def ready(state: StateDep) -> Response:
    """A model is loaded and requests can be served."""
    model = state.manager.current
    if model is None:
        return json_response(
            {"ready": False, "detail": state.manager.last_error or "no model loaded"}, 503
        )
    return json_response({"ready": True, "model_version": model.version})


@router.get("/model", responses=responses(ModelInfo))
async def model_info(state: StateDep) -> Response:
    """Name, version, run, data version and load time of the serving model."""
    model = state.manager.current
    settings = state.settings
    body = model.info() if model else {"model_name": settings.model_name, "model_version": None}
    body["last_load_error"] = state.manager.last_error
    body["log_mode"] = settings.log_mode
    body["shadow"] = state.shadow.info() if state.shadow is not None else None
    body["canary"] = state.canary.info()
    return json_response(body)


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
async def prometheus(state: StateDep) -> Response:
    """Prometheus metrics."""
    try:
        score = await asyncio.to_thread(state.store.latest_drift)
        if score is not None:
            metrics.DRIFT.set(score)
        windows = await asyncio.to_thread(state.store.latest_performance)
        _performance_gauges(windows or [])
    except Exception:  # noqa: BLE001 - metrics must answer even when the store is down
        pass
    content, media = metrics.render()
    return Response(content, media_type=media)


def _performance_gauges(windows: list[dict]) -> None:
    """The latest window of each version from the monitor's last report; a realized
    accuracy only where that window is mature (never a number on a biased few)."""
    latest: dict[str, dict] = {}
    for w in windows:
        latest[w["version"]] = w  # windows come oldest first
    for version, w in latest.items():
        figures = {
            "label_coverage": w["coverage"],
            "label_latency_p50_s": w["latency_p50_s"],
            "realized_accuracy": w["realized"],
            "estimated_accuracy": w["estimated"],
            "estimated_accuracy_low": w["estimated_low"],
            "estimated_accuracy_high": w["estimated_high"],
        }
        for figure, value in figures.items():
            if value is not None:
                metrics.PERFORMANCE.labels(version, figure).set(value)
