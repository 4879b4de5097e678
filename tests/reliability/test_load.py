"""Load: M clients, N predictions with client ids, then labels: the store holds exactly N
rows, every label is joined, no response was an error. SQLite and PostgreSQL, 1 and 2
server workers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import get_settings
from pipeline.store import PredictionStore
from serving.loadgen import run_load
from tests.serving.helpers import digits_stream

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
N, CLIENTS = 600, 8


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_load_loses_nothing(served, live_server, digits_rows, backend, workers, request):
    url = get_settings().prediction_db if backend == "sqlite" else request.getfixturevalue("pg_url")
    server = live_server(workers=workers, env={"MLOPS_PREDICTION_DB_URL": url})
    labels = digits_stream()["label"].to_numpy()
    result = run_load(server.url, digits_rows.tolist(), labels, N, CLIENTS)

    assert result.failures == []
    assert len(result.acknowledged) == N and len(set(result.acknowledged)) == N
    store = PredictionStore(url)
    try:
        assert store.count() == N
        assert store.count(labelled=True) == N == result.labels_posted
        sample = store.get(result.acknowledged[:50])
        for pid, row in sample.items():
            k = int(pid.rsplit("-", 1)[1])
            assert row["true_label"] == labels[k % len(labels)]
            np.testing.assert_allclose(row["features"], digits_rows[k % len(digits_rows)])
    finally:
        store.dispose()
