"""JSON responses written with orjson (numpy arrays included), bypassing FastAPI's encoder."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from pipeline.redact import redact


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


V2_PREFIX = "/v2"  # the Open Inference Protocol's routes (serving/routes/v2.py)


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(detail: str, v2: bool = False, **extra: Any) -> dict:
    """The one error shape of the API, `{"detail": "...", ...}`, credentials redacted; with
    `v2`, the Open Inference Protocol's `{"error": "..."}` (what tritonclient reads) with
    the same words as `detail` beside it."""
    detail = redact(detail)
    return {"error": detail, "detail": detail} if v2 else {"detail": detail, **extra}


def error(status: int, detail: str, v2: bool = False, **extra: Any) -> Response:
    return json_response(error_body(detail, v2, **extra), status)


def store_unavailable(exc: Exception, v2: bool = False, path: str = "") -> Response:
    """503 when the prediction log cannot take the rows: the request is not answered
    unlogged. A label request (`/feedback`) logs nothing: it says that none of its labels
    were applied (it had said nothing was logged, as if predictions had been lost)."""
    if path == "/feedback":
        return error(503, f"prediction store unavailable, no label was applied: {exc}", v2)
    return error(503, f"prediction store unavailable, nothing was logged: {exc}", v2)
