"""Rows unlike the training data (other units, other ranges) are flagged, counted on
/metrics, or refused: never silently answered."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from pipeline.config import get_settings
from pipeline.store import PredictionStore
from serving.app import create_app


def _client(monkeypatch, mode: str) -> TestClient:
    monkeypatch.setenv("MLOPS_OUT_OF_RANGE", mode)
    get_settings.cache_clear()
    return TestClient(create_app(get_settings()))


def _metric(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("mlops_rows_out_of_range_total "):
            return float(line.split()[1])
    return 0.0


def test_rows_in_other_units_are_flagged_counted_and_logged(served, monkeypatch, digits_rows):
    rows = digits_rows[:4].copy()
    rows[2:] /= 16  # pixels in 0-1 sent to a model trained on 0-16
    with _client(monkeypatch, "flag") as client:
        before = _metric(client)
        res = client.post("/predict", json={"instances": rows.tolist(), "ids": list("abcd")})
        assert res.status_code == 200
        flags = [p.get("out_of_range", False) for p in res.json()["predictions"]]
        assert flags == [False, False, True, True]
        assert res.headers["X-Out-Of-Range"] == "2"
        assert _metric(client) - before == 2
        ok = client.post("/predict", json={"instances": digits_rows[:3].tolist()})
        assert "X-Out-Of-Range" not in ok.headers
        assert all("out_of_range" not in p for p in ok.json()["predictions"])
    store = PredictionStore(get_settings().prediction_db)
    try:
        assert set(store.get(list("abcd"))) == set("abcd")  # flagged rows are still logged
    finally:
        store.dispose()


def test_refuse_mode_answers_422_and_logs_nothing(served, monkeypatch, digits_rows):
    rows = digits_rows[:3].copy()
    rows[1] *= 40  # far beyond any training value
    with _client(monkeypatch, "refuse") as client:
        res = client.post("/predict", json={"instances": rows.tolist(), "ids": ["x", "y", "z"]})
        assert res.status_code == 422
        assert res.json()["rows"] == [1] and "outside the ranges" in res.json()["detail"]
        assert client.get("/health").status_code == 200
    store = PredictionStore(get_settings().prediction_db)
    try:
        assert store.get(["x", "y", "z"]) == {}
    finally:
        store.dispose()


def test_off_mode_checks_nothing(served, monkeypatch, digits_rows):
    with _client(monkeypatch, "off") as client:
        res = client.post("/predict", json={"instances": (digits_rows[:2] / 16).tolist()})
        assert res.status_code == 200 and "X-Out-Of-Range" not in res.headers
        assert all("out_of_range" not in p for p in res.json()["predictions"])


def test_the_flag_is_documented_in_the_openapi_schema(served, monkeypatch):
    with _client(monkeypatch, "flag") as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Prediction"]
    assert "out_of_range" in schema["properties"]


def test_digits_scaled_down_are_unlike_training_data(digits_rows):
    from pipeline.preprocess import Preprocessor
    from pipeline.validate import Schema

    schema = Schema(tuple(f"pixel{i}" for i in range(64)), 10)
    pre = Preprocessor.fit(digits_rows, schema)
    assert not pre.out_of_range(digits_rows).any()
    assert pre.out_of_range(digits_rows / 16).all()
    assert pre.out_of_range(digits_rows * 255 / 16).all()
    restored = Preprocessor.from_json(pre.to_json())
    np.testing.assert_array_equal(restored.out_of_range(digits_rows / 16), True)
    legacy = pre.to_dict()
    for key in ("low", "high", "row_peak"):
        legacy.pop(key)
    legacy["version"] = 1
    assert not Preprocessor.from_dict(legacy).out_of_range(digits_rows / 16).any()
