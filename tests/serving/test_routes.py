"""Every route: happy path, refusals (401/403/404/413/415/422), and what reaches the store."""

from __future__ import annotations

import functools
import inspect
import json
import time

import jsonschema
import mlflow
import numpy as np
import pandas as pd
import pytest
import referencing
import referencing.jsonschema
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings, get_settings
from pipeline.store import LoggedRequest, PredictionStore
from serving import requests
from serving.app import create_app

MAX_ROWS = Settings.model_fields["max_rows_per_request"].default


@pytest.fixture
def client(served, monkeypatch):
    monkeypatch.setenv("MLOPS_ADMIN_TOKEN", "admin-secret")
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        yield c


def _store() -> PredictionStore:
    return PredictionStore(get_settings().prediction_db)


def _predict(client, rows, ids=None, **kw):
    body = {"instances": np.asarray(rows).tolist()}
    if ids is not None:
        body["ids"] = ids
    return client.post("/predict", json=body, **kw)


def test_ops_routes(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "model_version": "1"}
    info = client.get("/model").json()
    assert info["model_version"] == "1" and info["n_features"] == 64 and info["run_id"]
    assert info["data_hash"] and info["last_load_error"] is None
    assert client.get("/no/such/route").status_code == 404
    root = client.get("/").json()  # the root points the way
    assert root["model_version"] == "1" and root["links"]["docs"] == "/docs"
    assert all(client.get(root["links"][k]).status_code == 200 for k in ("health", "model"))


def test_predict_answers_like_the_pipeline_and_logs_every_row(client, digits_rows):
    from pipeline.registry import load_predictor

    rows = digits_rows[:5]
    res = _predict(client, rows, ids=[f"c-{i}" for i in range(5)])
    assert res.status_code == 200
    body = res.json()
    assert res.headers["x-model-version"] == body["model_version"] == "1"
    assert [p["id"] for p in body["predictions"]] == [f"c-{i}" for i in range(5)]
    own, _ = load_predictor(get_settings().model_name, "1")
    expected = own.predict_proba(rows)
    np.testing.assert_allclose(
        [p["probabilities"] for p in body["predictions"]], expected, atol=1e-6
    )
    assert [p["label"] for p in body["predictions"]] == expected.argmax(1).tolist()

    stored = _store().get([f"c-{i}" for i in range(5)])
    assert len(stored) == 5
    row = stored["c-3"]
    assert row["model_version"] == "1" and row["label"] == expected[3].argmax()
    np.testing.assert_allclose(row["features"], rows[3])
    assert row["latency_ms"] > 0 and row["true_label"] is None


def test_generated_ids_and_idempotent_retries(client, digits_rows):
    first = _predict(client, digits_rows[:3]).json()
    ids = [p["id"] for p in first["predictions"]]
    assert len(set(ids)) == 3
    before = _store().count()
    for _ in range(3):  # a client retrying the same ids
        assert _predict(client, digits_rows[:2], ids=["r-1", "r-2"]).status_code == 200
    assert _store().count() == before + 2


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b'{"instances": [[1,2]]}', {"content-type": "text/plain"}, 415, "Content-Type"),
        (b"{not json", None, 400, "not valid JSON"),
        (b"", None, 400, "empty body"),
        (b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", None, 400, "not valid JSON"),
        (b'{"instances": []}', None, 422, "empty"),
        (b'{"instances": [[1, 2, 3]]}', None, 422, "needs 64 features"),
        (b'{"instances": [1, 2, 3]}', None, 422, "2-D"),
        (b'{"instances": [[[1]]]}', None, 422, "2-D"),
        (b'{"instances": "abc"}', None, 422, "must be a list"),
        (json.dumps({"instances": [["a"] * 64]}).encode(), None, 422, "strings"),
        (json.dumps({"instances": [[1e39] * 64]}).encode(), None, 422, "not a finite"),
        (json.dumps({"instances": [[0] * 64, [0] * 63]}).encode(), None, 422, "different lengths"),
        (json.dumps({"instances": [[None] * 64]}).encode(), None, 422, "non-numeric"),
        (json.dumps({"instances": [{}, [0] * 64]}).encode(), None, 422, "list of 64 numbers"),
        (json.dumps({"instances": [[-(2**200)] * 64]}).encode(), None, 422, "not a finite"),
        (json.dumps({"instances": [[0] * 64], "extra": 1}).encode(), None, 422, "unknown field"),
        (json.dumps({"rows": [[0] * 64]}).encode(), None, 422, "unknown field"),
        (json.dumps([[0] * 64]).encode(), None, 422, "expected a JSON object"),
        (
            json.dumps({"instances": [[0] * 64] * 2, "ids": ["x", "x"]}).encode(),
            None,
            422,
            "unique",
        ),
        (json.dumps({"instances": [[0] * 64], "ids": ["a b"]}).encode(), None, 422, "printable"),
        (
            json.dumps(
                {"instances": [[0] * 64], "ids": ["1'; DROP TABLE predictions;--"]}
            ).encode(),
            None,
            422,
            "printable",
        ),
        (
            json.dumps({"instances": [[0] * 64] * (MAX_ROWS + 1)}).encode(),
            None,
            413,
            f"limit is {MAX_ROWS}",
        ),
    ],
)
def test_bad_predict_requests_get_a_clear_4xx_and_log_nothing(
    client, body, headers, status, message
):
    before = _store().count()
    res = client.post(
        "/predict", content=body, headers=headers or {"content-type": "application/json"}
    )
    assert res.status_code == status, res.text
    assert message in res.json()["detail"]
    assert _store().count() == before


def test_the_numbers_only_body_converts_as_the_general_path_does():
    """A body of numbers alone is cast to float32 in one step (`numbers_only`): the same
    bits as the path any other body takes, or it is left to that path; anything but numbers
    under the one key keeps the general path and its checks."""
    from serving.requests import BadRequest, _plain_numbers, numbers_only, rows_to_array

    rng = np.random.default_rng(3)
    floats = rng.normal(0, 1e3, (64, 64)).tolist()
    floats[0][:8] = [0, -1, 255, 16, 2**24, 1e-45, -0.0, 0.1]  # ints, subnormal, -0
    ints = rng.integers(-(2**24), 2**24, (64, 64), endpoint=True).tolist()
    # all integers beyond 2^24: a straight cast rounds 2^54 + 2^30 + 1 twice (to 2^54)
    wide = [[2**54 + 2**30 + 1] * 64, [2**25 + 1] * 64]
    for rows, straight in ((floats, True), (ints, True), (wide, False)):
        body = json.dumps({"instances": rows}).encode()
        assert numbers_only(body, b"instances")
        assert (_plain_numbers(rows, 64) is not None) is straight
        fast = rows_to_array(rows, 64, 100, numbers=True)
        general = rows_to_array(rows, 64, 100)
        assert fast.dtype == general.dtype == np.float32
        assert fast.tobytes() == general.tobytes()
    assert rows_to_array(wide, 64, 100)[0, 0] == np.float32(2**54 + 2**31)  # the nearest

    def refusal(rows, **how):
        with pytest.raises(BadRequest) as caught:
            rows_to_array(rows, 64, 100, **how)
        return caught.value.status, caught.value.detail

    for bad in ([[1e39] * 64], [{}, [0] * 64], [[0] * 64, [0] * 63], [[[0] * 64]], [[0] * 3]):
        assert refusal(bad, numbers=True) == refusal(bad)
    for other in (
        {"instances": floats, "ids": [str(i) for i in range(64)]},
        {"instances": [["1.5"] * 64]},
        {"instances": [[True] + [0] * 63]},
        {"instances": [[None] * 64]},
        {"instances": [{"a": 1}]},
    ):
        assert not numbers_only(json.dumps(other).encode(), b"instances"), other
    assert not numbers_only(json.dumps({"rows": [[1]]}).encode(), b"instances")


def test_oversized_body_is_413_before_parsing(client):
    big = b'{"instances": [[' + b"0," * 3_000_000 + b"0]]}"
    res = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "larger than" in res.json()["detail"]
    assert client.get("/health").status_code == 200


def test_openapi_documents_the_bodies_from_the_schema_models(client, digits_rows):
    """The request bodies in /openapi.json are the pydantic models' schemas; every $ref
    resolves, and a real request validates against its operation's schema."""
    spec = client.get("/openapi.json").json()
    registry = referencing.Registry().with_resource(
        "urn:spec", referencing.jsonschema.DRAFT202012.create_resource(spec)
    )

    def body_schema(path: str) -> dict:
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return {"$ref": "urn:spec" + ref["$ref"]}

    def valid(path: str, body) -> bool:
        validator = jsonschema.Draft202012Validator(body_schema(path), registry=registry)
        return validator.is_valid(body)

    rows = digits_rows[:2].tolist()
    assert valid("/predict", {"instances": rows, "ids": ["a", "b"]})
    assert not valid("/predict", {"instances": rows, "extra": 1})
    assert valid("/invocations", {"dataframe_split": {"columns": ["pixel0"], "data": [[1.0]]}})
    assert valid("/feedback", {"labels": [{"id": "a", "label": 3}], "overwrite": True})
    assert not valid("/feedback", {"labels": [{"id": "a", "label": "3"}]})
    resolver = registry.resolver()
    for ref in _refs(spec):  # every $ref anywhere in the document resolves
        resolver.lookup("urn:spec" + ref)


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_invocations_speaks_mlflow_scoring_protocol(client, digits_rows):
    rows = digits_rows[:4]
    names = [f"pixel{i}" for i in range(64)]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{get_settings().model_name}/1")
    expected = pyfunc.predict(pd.DataFrame(rows, columns=names)).to_dict(orient="records")
    shuffled = names[::-1]
    payloads = [
        {"dataframe_split": {"columns": names, "data": rows.tolist()}},
        {"dataframe_split": {"columns": shuffled, "data": rows[:, ::-1].tolist()}},
        {"dataframe_records": [dict(zip(names, r, strict=True)) for r in rows.tolist()]},
        {"instances": rows.tolist()},
        {"inputs": rows.tolist()},
        {"inputs": {n: rows[:, i].tolist() for i, n in enumerate(names)}},
    ]
    for payload in payloads:
        res = client.post("/invocations", json=payload)
        assert res.status_code == 200, (payload.keys(), res.text)
        got = res.json()["predictions"]
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        np.testing.assert_allclose(
            [[g[f"prob_{k}"] for k in range(10)] for g in got],
            [[e[f"prob_{k}"] for k in range(10)] for e in expected],
            atol=1e-6,
        )
        assert res.headers["x-model-version"] == "1"
    bad = client.post(
        "/invocations", json={"dataframe_split": {"columns": names[:3], "data": [[1, 2, 3]]}}
    )
    assert bad.status_code == 422 and "missing column" in bad.json()["detail"]
    both = client.post("/invocations", json={"inputs": [], "instances": []})
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]


def test_a_request_with_server_ids_is_one_log_record_its_rows_labelled_by_id(client, digits_rows):
    """Rows the server names are kept as one record a request; each id still answers
    /feedback and lineage's lookup, and the labelled row is what the feedback pull reads."""
    import sqlite3

    first = _predict(client, digits_rows[:5]).json()["predictions"]
    second = _predict(client, digits_rows[5:6]).json()["predictions"]
    store = _store()
    path = store.engine.url.database
    with sqlite3.connect(path) as log:
        assert log.execute("SELECT count(*), sum(n_rows) FROM prediction_requests").fetchone() == (
            2,
            6,
        )
        assert log.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
    assert store.count() == 6
    row = store.get([first[3]["id"]])[first[3]["id"]]
    assert row["label"] == first[3]["label"] and row["model_version"] == "1"
    assert row["features"] == pytest.approx(digits_rows[3].tolist())
    labels = [{"id": first[3]["id"], "label": 7}, {"id": second[0]["id"], "label": 2}]
    res = client.post("/feedback", json={"labels": labels})
    assert [r["status"] for r in res.json()["results"]] == ["labelled", "labelled"]
    pulled = {r["id"]: r["true_label"] for r in store.labelled_since(0)}
    assert pulled == {first[3]["id"]: 7, second[0]["id"]: 2}
    assert store.count() == 6 and len(store.unlabelled(get_settings().model_name)) == 4
    gone = first[0]["id"][:-4] + "0009"  # the id of a row that request did not have
    res = client.post("/feedback", json={"labels": [{"id": gone, "label": 1}]})
    assert res.json()["results"][0]["status"] == "unknown_id"


def test_feedback_outcomes(client, digits_rows):
    _predict(client, digits_rows[:3], ids=["f-1", "f-2", "f-3"])
    res = client.post(
        "/feedback",
        json={
            "labels": [
                {"id": "f-1", "label": 4},
                {"id": "nope", "label": 1},
                {"id": "f-2", "label": 12},
                {"id": "f-3", "label": "7"},
            ]
        },
    )
    assert res.status_code == 200
    status = {(r["id"], r["status"]) for r in res.json()["results"]}
    assert status == {
        ("f-1", "labelled"),
        ("nope", "unknown_id"),
        ("f-2", "invalid_label"),
        ("f-3", "invalid_label"),
    }
    stored = _store().get(["f-1"])["f-1"]
    assert stored["true_label"] == 4 and stored["labelled_at"] > 0

    again = client.post("/feedback", json={"labels": [{"id": "f-1", "label": 4}]})
    assert again.json()["results"][0]["status"] == "unchanged"

    conflict = client.post(
        "/feedback", json={"labels": [{"id": "f-1", "label": 5}, {"id": "f-3", "label": 2}]}
    )
    assert conflict.status_code == 409
    assert _store().get(["f-1", "f-3"])["f-1"]["true_label"] == 4
    assert _store().get(["f-3"])["f-3"]["true_label"] is None  # nothing applied

    forced = client.post(
        "/feedback", json={"labels": [{"id": "f-1", "label": 5}], "overwrite": True}
    )
    assert forced.json()["results"][0]["status"] == "overwritten"
    assert _store().get(["f-1"])["f-1"]["true_label"] == 5
    for bad in ({"labels": []}, {"labels": "x"}, {"nope": 1}, {"labels": [{}], "overwrite": 3}):
        assert client.post("/feedback", json=bad).status_code == 422


def test_admin_routes_need_the_token(client):
    assert client.post("/admin/reload").status_code == 401
    assert (
        client.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 401
    )
    ok = client.post("/admin/reload", headers={"authorization": "Bearer admin-secret"})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"
    assert "admin-secret" not in ok.text


def test_admin_routes_closed_without_a_token(served, monkeypatch):
    monkeypatch.delenv("MLOPS_ADMIN_TOKEN", raising=False)
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        res = c.post("/admin/reload", headers={"authorization": "Bearer anything"})
        assert res.status_code == 403 and "disabled" in res.json()["detail"]


@pytest.mark.parametrize("otel", [False, True])
def test_fastapi_telemetry_only_when_asked_for(served, monkeypatch, otel):
    """MLOPS_OTEL hands FastAPI's OpenTelemetry hooks back; off, create_app turns them off."""
    import serving.app

    monkeypatch.setenv("MLOPS_OTEL", str(otel).lower())
    get_settings.cache_clear()
    built: list[dict] = []

    class RecordingFastAPI(FastAPI):
        @functools.wraps(FastAPI.__init__)  # the same signature, for the feature check
        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(**kwargs)

    import fastapi_offline.core  # create_app builds FastAPI through FastAPIOffline

    monkeypatch.setattr(fastapi_offline.core, "FastAPI", RecordingFastAPI)
    create_app(get_settings())
    (kwargs,) = built
    if otel or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        assert "telemetry" not in kwargs  # FastAPI's own defaults (or no hooks at all)
    else:
        assert kwargs["telemetry"] == dict.fromkeys(
            ("tracing", "metrics", "logs", "operation_spans"), False
        )
    assert serving.app.telemetry_options(get_settings()) == {
        k: v for k, v in kwargs.items() if k == "telemetry"
    }


def test_api_key_protects_predict_and_feedback(served, monkeypatch, digits_rows):
    monkeypatch.setenv("MLOPS_API_KEY", "k-123")
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        assert _predict(c, digits_rows[:1]).status_code == 401
        assert c.post("/feedback", json={"labels": [{"id": "a", "label": 1}]}).status_code == 401
        assert _predict(c, digits_rows[:1], headers={"x-api-key": "k-123"}).status_code == 200
        assert c.get("/health").status_code == 200  # ops routes stay open
        # whitespace around the key counts the same on both sides (a pasted newline)
        for sent in ("k-123 ", " k-123", "k-123\t"):
            assert _predict(c, digits_rows[:1], headers={"x-api-key": sent}).status_code == 200
        assert _predict(c, digits_rows[:1], headers={"x-api-key": "k-12"}).status_code == 401


def test_booleans_are_refused_alone_and_among_numbers(client, digits_rows):
    row = digits_rows[0].tolist()
    for bad in ([True] * 64, [True, *row[1:]], [*row[:-1], False]):
        res = client.post("/predict", json={"instances": [row, bad]})
        assert res.status_code == 422, res.text
        assert "booleans" in res.json()["detail"]
    assert _store().count() == 0  # nothing logged


def test_the_words_true_and_false_in_ids_are_not_taken_for_booleans(client, digits_rows):
    """The boolean scan is skipped only when the body lacks the literals; ids that spell
    them must still pass, and a real boolean after them must still be refused."""
    res = _predict(client, digits_rows[:2], ids=["true", "false"])
    assert res.status_code == 200, res.text
    assert [p["id"] for p in res.json()["predictions"]] == ["true", "false"]
    row = digits_rows[0].tolist()
    res = client.post("/predict", json={"instances": [row, [*row[:-1], True]], "ids": ["a", "b"]})
    assert res.status_code == 422, res.text


def test_labels_outside_the_predicting_models_classes_are_refused_without_a_model(
    client, digits_rows
):
    """/feedback checks a label against the classes of the model that made the prediction
    (stored with it), so it holds while no model is loaded too."""
    assert _predict(client, digits_rows[:2], ids=["n-1", "n-2"]).status_code == 200
    client.app.state.mlops.manager.current = None  # as after a failed start-up load
    res = client.post(
        "/feedback", json={"labels": [{"id": "n-1", "label": 10}, {"id": "n-2", "label": 9}]}
    )
    assert res.status_code == 200, res.text
    status = {r["id"]: r["status"] for r in res.json()["results"]}
    assert status == {"n-1": "invalid_label", "n-2": "labelled"}
    stored = _store().get(["n-1", "n-2"])
    assert stored["n-1"]["true_label"] is None and stored["n-2"]["true_label"] == 9


def test_labels_are_checked_against_the_model_that_predicted_not_the_one_served(
    client, digits_rows
):
    """After the class count changed (a new data version with more or fewer classes), a
    prediction of the older model takes its own classes' labels: rows logged by a 12-class
    model take 11 while the 10-class champion serves, and the champion's rows still refuse
    10 (the route used to check every label against the model served now)."""
    older = LoggedRequest(
        ["wide-1", "wide-2"],
        time.time(),
        get_settings().model_name,
        "0",
        digits_rows[:2].astype(np.float32),
        [11, 3],
        np.full((2, 12), 1 / 12, np.float32),
        1.0,
    )
    assert _store().insert_requests([older]) == 2
    assert _predict(client, digits_rows[:1], ids=["narrow-1"]).status_code == 200
    res = client.post(
        "/feedback",
        json={
            "labels": [
                {"id": "wide-1", "label": 11},
                {"id": "wide-2", "label": 12},
                {"id": "narrow-1", "label": 10},
            ]
        },
    )
    assert res.status_code == 200, res.text
    status = {r["id"]: r["status"] for r in res.json()["results"]}
    assert status == {"wide-1": "labelled", "wide-2": "invalid_label", "narrow-1": "invalid_label"}
    assert _store().get(["wide-1"])["wide-1"]["true_label"] == 11


def _load_failures(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("mlops_model_load_failures_total "):
            return float(line.split()[1])
    return 0.0


def test_failed_reload_keeps_the_old_model(client):
    failures = _load_failures(client)
    res = client.post("/admin/reload?version=99", headers={"authorization": "Bearer admin-secret"})
    assert res.status_code == 404 and "still serving v1" in res.json()["detail"]
    info = client.get("/model").json()
    assert info["model_version"] == "1" and "99" in info["last_load_error"]
    assert client.get("/ready").json()["ready"] is True
    assert _load_failures(client) == failures + 1


def test_metrics_exposition(client, digits_rows):
    _predict(client, digits_rows[:2])
    client.post("/predict", json={"instances": [[1, 2]]})  # a 422
    text = client.get("/metrics").text
    for name in (
        'mlops_requests_total{route="/predict",status="200"}',
        'mlops_request_seconds_count{route="/predict",status="200"}',
        'mlops_request_seconds_count{route="/predict",status="422"}',
        "mlops_batch_rows_bucket",
        "mlops_log_queue_depth",
        "mlops_log_commit_lag_seconds_bucket",
        "mlops_model_version 1.0",
    ):
        assert name in text


def test_store_down_fails_fast_with_503(served, monkeypatch, digits_rows):
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", "postgresql://mlops@127.0.0.1:1/none")
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        res = _predict(c, digits_rows[:1])
        assert res.status_code == 503
        assert "prediction store unavailable, nothing was logged" in res.json()["detail"]
        # a label request says what it lost: no label, not (as before) "nothing was logged"
        res = c.post("/feedback", json={"labels": [{"id": "p-1", "label": 1}]})
        assert res.status_code == 503
        assert "prediction store unavailable, no label was applied" in res.json()["detail"]
        assert c.get("/health").status_code == 200


def test_no_model_yet_is_503_not_a_crash(project, monkeypatch):
    monkeypatch.setenv("MLOPS_RELOAD_INTERVAL_S", "0")
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        assert c.get("/ready").status_code == 503
        res = c.post("/predict", json={"instances": [[0] * 64]})
        assert res.status_code == 503 and "no model loaded" in res.json()["detail"]


def test_a_deleted_log_file_is_noticed_and_nothing_acknowledged_is_lost(client, digits_rows):
    import os
    import sqlite3

    path = get_settings().prediction_db.removeprefix("sqlite:///")
    assert _predict(client, digits_rows[:2]).status_code == 200
    os.remove(path)
    statuses, acknowledged, bodies = [], [], []
    for i in range(20):
        res = _predict(client, digits_rows[i : i + 1], ids=[f"after-{i}"])
        statuses.append(res.status_code)
        bodies.append(res.json().get("detail", ""))
        if res.status_code == 200:
            acknowledged.append(f"after-{i}")
    # The commit that notices it is not acknowledged where it went (the deleted file): a
    # small group committed on the event loop is handed to the writer thread, which commits
    # it again into the file reopened at the path and acknowledges it then; a group the
    # writer thread noticed it with is answered 503 with a retry. Either way every
    # acknowledged row is in the file a reader of the path opens.
    assert statuses[-1] == 200, statuses
    for status, body in zip(statuses, bodies, strict=True):
        assert status == 200 or (status == 503 and "was deleted while open" in body), body
    found = {r[0] for r in sqlite3.connect(path).execute("SELECT id FROM prediction_rows")}
    assert set(acknowledged) <= found and len(acknowledged) >= 18


def test_docs_work_offline_with_examples_the_model_accepts(client):
    """/docs loads Swagger UI from the server itself (no CDN), and the request examples in
    the OpenAPI document are accepted as they are by the serving model."""
    html = client.get("/docs").text
    assert "cdn" not in html.lower() and "/static-offline-docs/swagger-ui-bundle.js" in html
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]

    def example(path: str) -> dict:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]

    assert len(example("/predict")["instances"][0]) == 64
    assert client.post("/predict", json=example("/predict")).status_code == 200
    assert client.post("/invocations", json=example("/invocations")).status_code == 200
    res = client.post("/feedback", json=example("/feedback"))
    assert res.status_code == 200 and res.json()["results"][0]["status"] == "labelled"


def _parse_outcome(body: bytes, n_features: int, fast: bool, monkeypatch) -> tuple:
    """parse_instances' answer to a body, with simdjson's path on or off: the rows' float32
    bits and count of ids, or the refusal's status and words."""
    from types import SimpleNamespace

    from serving import requests
    from serving.routes.predict import parse_instances

    model = SimpleNamespace(predictor=SimpleNamespace(cfg=SimpleNamespace(n_features=n_features)))
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(requests, "simdjson", None)
        try:
            rows, ids = parse_instances(body, "application/json", model, 8)
        except requests.BadRequest as exc:
            return "refused", exc.status, exc.detail
    return rows.dtype.str, rows.shape, rows.tobytes(), len(ids), len(set(ids))


VALID_NUMBERS = ["0", "-0", "-0.0", "1", "16", "0.1", "1e5", "1E+2", "2.5e-3", "-7", "16777216"]
ODD_NUMBERS = ["16777217", "1e39", "1e400", "01", ".5", "1.", "+1", "--1", "1e", "1" + "0" * 20]
# mostly numbers JSON allows, so that most bodies get as far as their shape
number_texts = st.sampled_from(VALID_NUMBERS * 6 + ODD_NUMBERS)


@pytest.mark.skipif(requests.simdjson is None, reason="no simdjson wheel for this Python")
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    width=st.integers(1, 4),
    table=st.lists(st.lists(number_texts, min_size=0, max_size=5), min_size=0, max_size=10),
    wrap=st.sampled_from(["plain", "nested", "deep", "scalar-row", "spaces", "cut"]),
)
@example(width=2, table=[["1", "2", "3"], ["4"]], wrap="plain")  # ragged, 2 x 2 values in all
@example(width=2, table=[["1"], ["2", "3"]], wrap="nested")  # [[[1]],[2,3]]
@example(width=1, table=[["1"], ["2"]], wrap="scalar-row")  # [[1],3]
@example(width=1, table=[["1"]] * 9, wrap="plain")  # over the limit of 8
@example(width=2, table=[["1", "2"], ["3", "4"]], wrap="deep")  # [[[1],[2]],[3,4]]
@example(width=1, table=[["1e39"]], wrap="plain")  # beyond float32
@example(width=1, table=[[str(2**54 + 2**30 + 1)]], wrap="plain")  # rounds twice as a double
def test_simdjson_rows_are_the_general_paths(width, table, wrap, monkeypatch):
    """A numbers-only body parsed by simdjson (`numeric_rows`) gives the very bits, shape
    and refusals the orjson path gives: every number spelling JSON allows or refuses, rows of
    other widths, nesting, too many rows (the limit here is 8), values beyond float32."""
    rows = [f"[{','.join(row)}]" for row in table]
    if wrap == "nested" and rows:
        rows[0] = f"[{rows[0]}]"
    if wrap == "deep" and table:  # each value of the first row an array of its own
        rows[0] = "[" + ",".join(f"[{value}]" for value in table[0]) + "]"
    if wrap == "scalar-row" and rows:
        rows[-1] = "3"
    sep = " , " if wrap == "spaces" else ","
    body = ('{"instances": [' + sep.join(rows) + "]}").encode()
    if wrap == "cut":
        body = body[:-1]
    assert _parse_outcome(body, width, True, monkeypatch) == _parse_outcome(
        body, width, False, monkeypatch
    )


def test_simdjson_takes_the_common_body(monkeypatch):
    """The body the demo and the bench send is parsed by simdjson, not handed back."""
    from serving import requests

    if requests.simdjson is None:
        pytest.skip("no simdjson wheel for this Python")
    rows = np.random.default_rng(0).integers(0, 17, (64, 64)).tolist()
    rows[1][:3] = [0.5, -0.0, 1e-3]
    body = json.dumps({"instances": rows}).encode()
    array = requests.numeric_rows(body, "instances", 64, 1024)
    assert array is not None and array.dtype == np.float32 and array.shape == (64, 64)
    assert array.tobytes() == np.array(rows, dtype=np.float32).tobytes()
    assert requests.numeric_rows(body, "instances", 64, 63) is None  # over the limit
    assert requests.numeric_rows(body, "instances", 63, 1024) is None  # another width


def test_an_overwrite_into_a_log_from_an_older_release_when_the_store_was_down_at_start(
    served, monkeypatch, digits_rows
):
    """The log's tables are brought up to date at start-up, and again on the first commit
    when the store was down then. An overwrite before any commit is a write too: it made
    the tables first instead of failing on the missing label_history (503)."""
    import sqlite3

    missing = served / "not-yet"  # no such folder: SQLite cannot open the file (down)
    url = f"sqlite:///{missing / 'log.db'}"
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", url)
    get_settings.cache_clear()
    with TestClient(create_app(get_settings())) as c:
        assert c.get("/health").status_code == 200
        missing.mkdir()  # the store is back, holding a log an older release wrote
        old = PredictionStore(url).create()
        x = np.asarray(digits_rows[:1], dtype=np.float32)
        p = np.full((1, 10), 0.1, dtype=np.float32)
        logged = LoggedRequest(["old-1"], time.time(), "digits-classifier", "1", x, [3], p, 1.0)
        assert old.insert_requests([logged]) == 1
        assert [o.status for o in old.add_labels([("old-1", 3)])] == ["labelled"]
        old.dispose()
        with sqlite3.connect(missing / "log.db") as conn:
            conn.execute("DROP TABLE label_history")
        res = c.post("/feedback", json={"labels": [{"id": "old-1", "label": 4}], "overwrite": True})
        assert res.status_code == 200, res.text
        assert res.json()["results"][0]["status"] == "overwritten"
    with sqlite3.connect(missing / "log.db") as conn:
        assert conn.execute("SELECT true_label FROM prediction_rows").fetchall() == [(4,)]
        assert conn.execute("SELECT previous_label FROM label_history").fetchall() == [(3,)]


def test_an_id_ending_in_a_newline_is_refused(client, digits_rows):
    """Ids are matched whole: the pattern's `$` took "abc\\n" (it matches before a final
    newline), so such an id was logged and labelled though `mlops predict` refuses it."""
    res = _predict(client, digits_rows[:1], ids=["abc\n"])
    assert res.status_code == 422, res.text
    res = client.post("/feedback", json={"labels": [{"id": "abc\n", "label": 1}]})
    assert res.json()["results"][0]["status"] == "invalid"
