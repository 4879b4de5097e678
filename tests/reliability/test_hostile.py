"""Hostile and bad input: a schema-driven fuzz of the whole HTTP API, oversized and odd
bodies, SQL-looking ids, malformed data files, and the admin token."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import get_settings
from pipeline.ingest import DataFileError, file_md5, ingest
from pipeline.store import PredictionStore
from tests.serving.conftest import in_process_app

pytestmark = pytest.mark.reliability
TOKEN = "s3cret-admin-token-for-tests"


@pytest.fixture(scope="module")
def app_client(base_project):
    with in_process_app(base_project, "hostile.db", MLOPS_ADMIN_TOKEN=TOKEN) as client:
        yield client


def _operations(client: TestClient) -> list[tuple[str, str, dict | None]]:
    """(method, path, request body schema with every $ref resolved) per operation."""
    spec = client.get("/openapi.json").json()
    ops = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = body.get("schema")
            ops.append((method.upper(), path, _resolve(schema, spec) if schema else None))
    return ops


def _resolve(node, spec: dict):
    """Inline `#/components/...` references (the request models nest, e.g. FeedbackLabel)."""
    if isinstance(node, list):
        return [_resolve(v, spec) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _resolve(target, spec)
    return {k: _resolve(v, spec) for k, v in node.items()}


def test_openapi_lists_every_route(app_client):
    paths = {path for _, path, _ in _operations(app_client)}
    assert {
        "/predict",
        "/invocations",
        "/feedback",
        "/health",
        "/ready",
        "/model",
        "/metrics",
        "/admin/reload",
    } <= paths


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values that follow an OpenAPI (JSON Schema) fragment, as far as this API uses it;
    types are sometimes violated on purpose, to reach the error paths too."""
    if "anyOf" in schema:  # e.g. `ids`: a list of strings, or null
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "object":
        props = {k: from_schema(v) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=70)
    base = {
        "number": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10, 10**6),
        "integer": st.integers(-5, 20),
        "string": st.text(max_size=40),
        "boolean": st.booleans(),
    }.get(kind, json_values)
    return base | json_values if kind else base


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_schema_driven_fuzz_of_every_operation_finds_no_5xx(app_client, data):
    """Bodies drawn from each operation's OpenAPI schema (and arbitrary JSON), query strings
    and headers: no 5xx, and the server still answers."""
    for method, path, schema in _operations(app_client):
        headers = data.draw(
            st.sampled_from(
                [
                    {},
                    {"authorization": "Bearer wrong"},
                    {"authorization": f"Bearer {TOKEN}"},
                    {"x-api-key": "' OR 1=1 --"},
                ]
            )
        )
        if method == "GET":
            res = app_client.get(path, headers=headers)
        else:
            body = (
                data.draw(from_schema(schema) if schema else json_values)
                if data.draw(st.booleans())
                else data.draw(json_values)
            )
            query = data.draw(
                st.sampled_from(["", "?version=1", "?version=abc", "?version=99999999999999999999"])
            )
            res = app_client.request(
                method,
                path + query,
                json=body,
                headers={"content-type": "application/json", **headers},
            )
        assert res.status_code < 500, (method, path, res.status_code, res.text[:300])
    assert app_client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),  # deeply nested
        (b'{"instances": [[1e999' + b", 0" * 63 + b"]]}", "application/json", 400),
        (b'{"instances": [[' + b"9" * 5000 + b"]]}", "application/json", 400),
        (b'{"instances": [[1e38' + b", 1e39" * 63 + b"]]}", "application/json", 422),
        (b'{"instances": [[Infinity' + b", 0" * 63 + b"]]}", "application/json", 400),
        (b'{"instances": [[0]]}', "application/xml", 415),
        (b'{"instances": [[0]]}', "multipart/form-data; boundary=x", 415),
        (b"\xff\xfe\x00\x01", "application/json", 400),
        (b'{"instances": ' + b"[" + b"[0]," * 2000 + b"[0]]}", "application/json", 413),
    ],
)
def test_odd_bodies_get_a_4xx_and_leave_the_store_unchanged(app_client, body, ctype, status):
    store = PredictionStore(get_settings().prediction_db)
    before = store.count()
    res = app_client.post("/predict", content=body, headers={"content-type": ctype})
    assert res.status_code == status, res.text[:300]
    assert res.json()["detail"]
    assert store.count() == before
    assert app_client.get("/health").status_code == 200


def test_sql_looking_ids_are_data_not_code(app_client):
    store = PredictionStore(get_settings().prediction_db)
    before = store.count()
    evil = "x');DROP_TABLE_predictions;--"
    res = app_client.post("/predict", json={"instances": [[0.0] * 64], "ids": [evil]})
    assert res.status_code == 200 and res.json()["predictions"][0]["id"] == evil
    assert store.count() == before + 1 and evil in store.get([evil])
    res = app_client.post("/feedback", json={"labels": [{"id": "1'OR'1'='1", "label": 1}]})
    assert res.json()["results"][0]["status"] == "unknown_id"
    res = app_client.post(
        "/predict", json={"instances": [[0.0] * 64], "ids": ["1' OR '1'='1"]}
    )  # spaces: refused
    assert res.status_code == 422 and store.count() == before + 1


def test_admin_token_goes_through_compare_digest_and_every_wrong_token_gets_the_same_401(
    app_client, monkeypatch
):
    """The property behind "constant time", checked without timing: every bearer token is
    handed whole to hmac.compare_digest (no length or prefix check before it that could
    answer sooner), and wrong tokens of any length or prefix get the same 401, never echoed."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    wrong = [
        "",
        "x",
        TOKEN[:1],
        TOKEN[:-1],  # a prefix of the token
        TOKEN + "x",  # the token and more
        "x" * len(TOKEN),  # the same length, nothing in common
        TOKEN[:-1] + chr(ord(TOKEN[-1]) + 1),  # the same length, the last byte differs
        "x" * 10_000,
    ]
    bodies = set()
    for sent in wrong:
        calls.clear()
        res = app_client.post("/admin/reload", headers={"authorization": f"Bearer {sent}"})
        assert res.status_code == 401 and TOKEN not in res.text
        assert calls == [(sent.encode(), TOKEN.encode())]
        bodies.add(res.content)
    for headers in ({}, {"authorization": "Basic " + TOKEN}, {"authorization": TOKEN}):
        res = app_client.post("/admin/reload", headers=headers)  # no bearer scheme at all
        assert res.status_code == 401 and TOKEN not in res.text
        bodies.add(res.content)
    assert len(bodies) == 1, bodies
    ok = app_client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and TOKEN not in ok.text


@pytest.mark.slow
def test_no_secret_in_server_logs(served, live_server):
    server = live_server(env={"MLOPS_ADMIN_TOKEN": TOKEN, "MLOPS_API_KEY": "key-" + TOKEN})
    for headers in ({"authorization": "Bearer wrong"}, {"authorization": f"Bearer {TOKEN}"}):
        httpx.post(server.url + "/admin/reload", headers=headers)
    httpx.post(
        server.url + "/predict",
        json={"instances": [[0.0] * 64]},
        headers={"x-api-key": "key-" + TOKEN},
    )
    httpx.get(server.url + "/model")
    server.stop()
    assert TOKEN not in server.logs()


# --- malformed data files at ingest --------------------------------------------------------------

HEADER = "label," + ",".join(f"pixel{i}" for i in range(64))


def _good(settings, params, tmp_path: Path) -> str:
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "\n" + ",".join(["1"] + ["0"] * 64) + "\n")
    ingest(str(good), settings.raw_dir, settings.quarantine_dir, params)
    return file_md5(settings.raw_dir / "dataset.parquet")


def test_zip_bomb_sized_csv_is_refused_unread(settings, params, tmp_path):
    before = _good(settings, params, tmp_path)
    bomb = tmp_path / "bomb.csv"
    with bomb.open("wb") as fh:  # 3 GiB, sparse: costs nothing to make, would to read
        fh.write(HEADER.encode() + b"\n")
        fh.truncate(3 * 1024**3)
    with pytest.raises(DataFileError, match="over the ingest limit"):
        ingest(str(bomb), settings.raw_dir, settings.quarantine_dir, params)
    assert file_md5(settings.raw_dir / "dataset.parquet") == before


def test_mixed_types_are_salvaged_row_by_row(settings, params, tmp_path):
    before = _good(settings, params, tmp_path)
    mixed = tmp_path / "mixed.csv"
    rows = [
        ",".join(["2"] + ["3"] * 64),
        ",".join(["4", "abc"] + ["1"] * 63),
        ",".join(["5", "true"] + ["1"] * 63),
        ",".join(["6"] + ["0x10"] + ["1"] * 63),
    ]
    mixed.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    report = ingest(str(mixed), settings.raw_dir, settings.quarantine_dir, params)
    assert report.rows_ok == 1 and report.rows_quarantined == 3
    assert file_md5(settings.raw_dir / "dataset.parquet") != before  # a new, valid version
    assert json.dumps(report.files[0]["reasons"]) == '{"non-numeric": 3}'
