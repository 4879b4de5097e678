"""The hot routes straight from ASGI: POST /predict, /invocations and V2's infer.

FastAPI's routing, dependency solving and Request objects cost about as much per 1-row
request as the whole of parsing, inference and logging. `GuardMiddleware` hands these
routes to `match`'s handler, which does what their FastAPI routes do, in the same order and
through the same code (`check_api_key`, `score_body` / `infer_body`, the same error bodies,
V2's own shape on V2's route):
the routes stay for the OpenAPI document and answer if the fast path is switched off
(MLOPS_FAST_PATH=false).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.datastructures import Headers

from pipeline.store import StoreUnavailable
from serving.deps import check_api_key
from serving.requests import BadRequest
from serving.responses import error, is_v2, store_unavailable
from serving.routes import predict, v2

ROUTES = {
    "/predict": (predict.parse_instances, predict.predictions),
    "/invocations": (predict.parse_mlflow, predict.mlflow_records),
}
_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def match(method: str, path: str):
    """The fast handler of a request, or None (FastAPI then routes it)."""
    if method != "POST":
        return None
    if path in ROUTES:
        parse, shape = ROUTES[path]
        return lambda state, read, headers: predict.score_body(
            state, read, headers.get("content-type"), parse, shape, headers.get(predict.CLIENT_ID)
        )
    found = _V2_INFER.match(path)
    if found:
        name, version = unquote(found[1]), found[2] and unquote(found[2])
        return lambda state, read, headers: v2.infer_body(state, name, version, read, headers.get)
    return None


async def handle(scope, receive, send, work) -> None:
    state = scope["app"].state.mlops
    headers = Headers(scope=scope)

    async def read_body() -> bytes:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "the client went away before the body was complete")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    try:
        check_api_key(state.settings, headers)
        response = await work(state, read_body, headers)
    except BadRequest as exc:  # V2's infer words its own errors: this is the API key's
        response = error(exc.status, exc.detail, is_v2(scope["path"]), **exc.extra)
    except StoreUnavailable as exc:
        response = store_unavailable(exc)
    await response(scope, receive, send)
