"""Prediction: our own protocol (/predict) and MLflow's scoring protocol (/invocations).

Both go through `score`: parse (the hand-written orjson parser, no pydantic on the hot
path), infer in the micro-batcher, log every row, answer; they differ only in the parser
and in the shape of the answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from pipeline.store import LoggedRequest, new_ids
from serving import metrics
from serving.deps import ApiKey, State, StateDep
from serving.requests import (
    CSV_TYPES,
    BadRequest,
    expect_object,
    may_hold_booleans,
    media_type,
    numbers_only,
    numeric_rows,
    parse_csv,
    parse_ids,
    parse_invocations,
    parse_json,
    rows_to_array,
)
from serving.responses import json_response
from serving.runtime import LoadedModel, NoModel
from serving.schemas import (
    InvocationsRequest,
    InvocationsResponse,
    PredictionRequest,
    PredictionResponse,
    json_body,
    responses,
)

router = APIRouter(tags=["predict"], dependencies=[ApiKey])
ERRORS = (400, 401, 413, 415, 422, 503)

# (body, content type, serving model, max rows) -> (rows, one id per row)
Parser = Callable[[bytes, str | None, LoadedModel, int], tuple[np.ndarray, list[str]]]
# (model that answered, ids, labels, probability lists, out-of-range flags) -> the JSON body
# (or a whole Response, for bodies that are not JSON)
Shaper = Callable[
    [LoadedModel, list[str], list[int], list[list[float]], np.ndarray], dict | Response
]


@router.post(
    "/predict",
    openapi_extra=json_body(PredictionRequest),
    responses=responses(PredictionResponse, *ERRORS),
)
async def predict(request: Request, state: StateDep) -> Response:
    """Predict rows of raw features; every row is logged under its id."""
    return await score(request, state, parse_instances, predictions)


@router.post(
    "/invocations",
    openapi_extra=json_body(InvocationsRequest, csv=True),
    responses=responses(InvocationsResponse, *ERRORS),
)
async def invocations(request: Request, state: StateDep) -> Response:
    """MLflow's scoring protocol (JSON in its four layouts, or `text/csv` with a header
    row), answered in MLflow's shape; rows are logged too."""
    return await score(request, state, parse_mlflow, mlflow_records)


def parse_instances(
    body: bytes, content_type: str | None, model: LoadedModel, max_rows: int
) -> tuple[np.ndarray, list[str]]:
    n_features = model.predictor.cfg.n_features
    numbers = numbers_only(body, b"instances")  # no ids, no strings: the common body
    if numbers and media_type(content_type) == "application/json":
        rows = numeric_rows(body, "instances", n_features, max_rows)
        if rows is not None:
            return rows, new_ids(len(rows))
    payload = expect_object(parse_json(body, content_type), {"instances", "ids"}, {"instances"})
    rows = rows_to_array(
        payload["instances"],
        n_features,
        max_rows,
        booleans=not numbers and may_hold_booleans(body),
        numbers=numbers,
    )
    return rows, parse_ids(payload.get("ids"), len(rows))


def parse_mlflow(
    body: bytes, content_type: str | None, model: LoadedModel, max_rows: int
) -> tuple[np.ndarray, list[str]]:
    names = model.predictor.feature_names
    if media_type(content_type) in CSV_TYPES:
        rows = parse_csv(body, names, max_rows)
    else:
        rows = parse_invocations(parse_json(body, content_type), names, max_rows)
    return rows, parse_ids(None, len(rows))


def predictions(
    used: LoadedModel, ids: list[str], labels: list[int], probs: list, unusual: np.ndarray
) -> dict:
    predictions = [
        {"id": i, "label": lbl, "probabilities": p}
        for i, lbl, p in zip(ids, labels, probs, strict=True)
    ]
    for k in np.flatnonzero(unusual):  # only flagged rows carry the key: the common case stays
        predictions[k]["out_of_range"] = True
    return {"model_name": used.name, "model_version": used.version, "predictions": predictions}


def mlflow_records(
    used: LoadedModel, ids: list[str], labels: list[int], probs: list, unusual: np.ndarray
) -> dict:
    return {
        "predictions": [
            {"label": lbl, **{f"prob_{k}": v for k, v in enumerate(p)}}
            for lbl, p in zip(labels, probs, strict=True)
        ]
    }


async def score(request: Request, state: State, parse: Parser, shape: Shaper) -> Response:
    """A route's scoring: see `score_body`."""
    headers = request.headers
    return await score_body(
        state, request.body, headers.get("content-type"), parse, shape, headers.get(CLIENT_ID)
    )


CLIENT_ID = "x-client-id"  # names a client for a canary's sticky split (serving/canary.py)


async def score_body(
    state: State,
    read_body: Callable[[], Awaitable[bytes]],
    content_type: str | None,
    parse: Parser,
    shape: Shaper,
    client_id: str | None = None,
    routable: bool = True,
) -> Response:
    """Read and parse (counted as arriving, for the micro-batcher), infer (on a canary's
    candidate when the client is in its share), log, offer the rows to the shadow, answer
    with `shape(...)` and the X-Model-Version header of the model that answered. The routes
    and the fast path of `serving.fastpath` both come here."""
    start = time.perf_counter()
    state.batcher.arriving += 1
    try:
        model = _model_or_503(state)
        rows, ids = parse(
            await read_body(),
            content_type,
            model,
            state.settings.max_rows_per_request,
        )
    finally:
        state.batcher.arriving -= 1
    unusual = _out_of_range(state, model, rows)
    probs, used = await _infer(state, rows, client_id, routable)
    labels = probs.argmax(axis=1).tolist()
    if state.shadow is not None and used is state.manager.current:
        state.shadow.offer(ids, rows, labels, used.version)  # never raises, never waits
    await _log(state, ids, rows, labels, probs, used, start)
    body = shape(used, ids, labels, probs.tolist(), unusual)
    response = body if isinstance(body, Response) else json_response(body)
    response.headers["X-Model-Version"] = used.version
    if unusual.any():
        response.headers["X-Out-Of-Range"] = str(int(unusual.sum()))
    return response


def _out_of_range(state: State, model: LoadedModel, rows: np.ndarray) -> np.ndarray:
    """Rows unlike the model's training data: counted, and flagged or refused."""
    mode = state.settings.out_of_range
    if mode == "off":
        return np.zeros(len(rows), dtype=bool)
    unusual = model.predictor.preprocessor.out_of_range(rows)
    count = int(unusual.sum())
    if count:
        metrics.OUT_OF_RANGE.inc(count)
        if mode == "refuse":
            raise BadRequest(
                422,
                f"{count} of {len(rows)} rows are outside the ranges of v{model.version}'s "
                "training data (other units or another kind of data?); nothing was predicted",
                rows=np.flatnonzero(unusual).tolist(),
            )
    return unusual


def _model_or_503(state: State) -> LoadedModel:
    model = state.manager.current
    if model is None:
        raise BadRequest(
            503, f"no model loaded ({state.manager.last_error or 'starting'}); see /ready"
        )
    return model


async def _infer(
    state: State, rows: np.ndarray, client_id: str | None = None, routable: bool = True
) -> tuple[np.ndarray, LoadedModel]:
    canary = state.canary
    if routable and canary.pick(client_id):
        candidate = canary.rollout["candidate"] if canary.rollout else None
        try:
            probs, used = await canary.batcher.predict(rows)
            if used.version == candidate:
                metrics.CANARY_ROWS.labels("served").inc(len(rows))
                return probs, used
        except Exception:  # noqa: BLE001 - the champion answers instead, and it is counted
            pass
        canary.failed(candidate or "?", len(rows))
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
    used: LoadedModel,
    start: float,
) -> None:
    if state.settings.log_mode == "off":
        return
    latency_ms = (time.perf_counter() - start) * 1000
    logged = LoggedRequest(
        ids, time.time(), used.name, used.version, rows, labels, probs, latency_ms,
        whole=state.shadow is None,  # a shadow's figures join the log's rows by id
    )  # fmt: skip
    future = state.writer.submit(logged, wait=state.settings.log_mode == "durable")
    if future is not None:
        await future  # durable: answer only once the rows are committed
