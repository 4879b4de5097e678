"""The fast path (POST /predict and /invocations straight from ASGI) answers exactly as the
FastAPI routes do: the same statuses, bodies and headers, good requests and bad alike."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pipeline.config import get_settings
from serving.app import create_app

ROW = [float(v % 16) for v in range(64)]
_V2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
CASES = [
    ("/predict", {"json": {"instances": [ROW], "ids": ["fast-1"]}}, {}),
    ("/predict", {"json": {"instances": [ROW, ROW]}}, {}),  # generated ids: compared apart
    ("/predict", {"json": {"instances": [ROW[:3]]}}, {}),
    ("/predict", {"json": {"instances": [[True] * 64]}}, {}),
    ("/predict", {"content": b"not json", "headers": {"content-type": "application/json"}}, {}),
    ("/predict", {"content": b"{}", "headers": {"content-type": "text/plain"}}, {}),
    ("/predict", {"json": {"instances": [ROW]}}, {"x-api-key": "wrong"}),
    ("/predict", {"content": b"x" * 70_000, "headers": {"content-type": "application/json"}}, {}),
    ("/invocations", {"json": {"inputs": [ROW]}}, {}),
    ("/invocations", {"content": b"a,b\n1,2\n", "headers": {"content-type": "text/csv"}}, {}),
    ("/v2/models/digits-classifier/infer", {"json": _V2 | {"id": "fast-v2"}}, {}),
    ("/v2/models/digits-classifier/versions/1/infer", {"json": _V2 | {"id": "fast-v2b"}}, {}),
    ("/v2/models/other-model/infer", {"json": _V2}, {}),
    ("/v2/models/digits-classifier/infer", {"json": {"inputs": []}}, {}),
    ("/v2/models/digits-classifier/infer", {"json": _V2}, {"x-api-key": ""}),
]


def _answers(served, monkeypatch, fast: bool) -> list:
    monkeypatch.setenv("MLOPS_FAST_PATH", str(fast).lower())
    monkeypatch.setenv("MLOPS_API_KEY", "the-key")
    monkeypatch.setenv("MLOPS_MAX_BODY_BYTES", "65536")
    get_settings.cache_clear()
    out = []
    with TestClient(create_app(get_settings())) as client:
        for path, kwargs, headers in CASES:
            sent = {**kwargs, "headers": {**kwargs.get("headers", {}), "x-api-key": "the-key"}}
            sent["headers"].update(headers)
            res = client.post(path, **sent)
            body = res.json()
            for p in body.get("predictions", []) if isinstance(body, dict) else []:
                if isinstance(p, dict) and not p.get("id", "fast-").startswith("fast-"):
                    p.pop("id")  # generated: differ between the two servers
            keep = ("content-type", "x-model-version", "x-out-of-range")
            out.append((res.status_code, body, {h: res.headers.get(h) for h in keep}))
    get_settings.cache_clear()
    return out


def test_fast_path_answers_like_the_routes(served, monkeypatch):
    fast = _answers(served, monkeypatch, fast=True)
    routed = _answers(served, monkeypatch, fast=False)
    statuses = [200, 200, 422, 422, 400, 415, 401, 413, 200, 422, 200, 200, 404, 400, 401]
    assert [s for s, _, _ in fast] == statuses
    for case, a, b in zip(CASES, fast, routed, strict=True):
        assert a == b, case[:2]


def _count(text: str, route: str, status: str) -> float:
    head = f'mlops_requests_total{{route="{route}",status="{status}"}}'
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(head)), 0.0)


@pytest.mark.parametrize("fast", [True, False])
def test_metrics_count_the_fast_path_by_route(served, monkeypatch, fast):
    monkeypatch.setenv("MLOPS_FAST_PATH", str(fast).lower())
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as client:
        before = client.get("/metrics").text
        assert client.post("/predict", json={"instances": [ROW]}).status_code == 200
        assert client.post("/predict", json={"instances": []}).status_code == 422
        after = client.get("/metrics").text
    get_settings.cache_clear()
    for status in ("200", "422"):
        assert _count(after, "/predict", status) == _count(before, "/predict", status) + 1


@pytest.mark.parametrize(("env", "fast"), [({}, True), ({"MLOPS_OTEL": "true"}, False)])
def test_fast_path_steps_aside_for_opentelemetry(served, monkeypatch, env, fast):
    """FastAPI's OTel spans come from its routes: asking for them routes everything there."""
    from serving.middleware import GuardMiddleware

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    app = create_app(get_settings())
    get_settings.cache_clear()
    guard = app.build_middleware_stack()  # the outermost layer of what FastAPI runs
    assert isinstance(guard, GuardMiddleware)
    assert guard.fast is fast
