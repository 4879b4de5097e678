"""Pure ASGI middleware: the body-size limit, per-route request metrics, and the hand-off of
the hot routes to `serving.fastpath`."""

from __future__ import annotations

import time

import orjson

from serving import fastpath, metrics
from serving.requests import BadRequest
from serving.responses import error_body, is_v2


class GuardMiddleware:
    """Body-size limit (413) and per-route request metrics, before any parsing; with `fast`,
    the hot routes go to `serving.fastpath` instead of FastAPI (inside the same limit and
    metrics).

    A declared Content-Length over the limit is refused before a byte of the body is read;
    a streamed (chunked) body is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app, max_body: int, known: set[str], fast: bool = False) -> None:
        self.app, self.max_body, self.known = app, max_body, known  # known: the app's paths
        self.fast = fast  # the hot routes served by serving.fastpath

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
        v2 = is_v2(scope["path"])  # V2's clients read their own error shape
        if too_big:
            await _send_json(send, 413, error_body(f"body larger than {self.max_body} bytes", v2))
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
                hot = fastpath.match(scope["method"], scope["path"]) if self.fast else None
                if hot is not None:
                    await fastpath.handle(scope, limited_receive, tracking_send, hot)
                else:
                    await self.app(scope, limited_receive, tracking_send)
            except BadRequest as exc:
                status_holder["status"] = exc.status
                await _send_json(send, exc.status, error_body(exc.detail, v2))
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
