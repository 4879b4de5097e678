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


def error(status: int, detail: str, **extra: Any) -> Response:
    """The one error shape of the API: `{"detail": "...", ...}`, credentials redacted."""
    return json_response({"detail": redact(detail), **extra}, status)


def store_unavailable(exc: Exception) -> Response:
    """503 when the prediction log cannot take the rows: the request is not answered unlogged."""
    return error(503, f"prediction store unavailable, nothing was logged: {exc}")
