"""The protocols other clients speak: MLflow's scoring server (`/ping`, `/version`,
`/invocations` with JSON or CSV), checked against the registered pyfunc's own answers and
with MLflow's own client on a real server process."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipeline.config import get_settings
from pipeline.store import PredictionStore
from serving.app import create_app

NAMES = [f"pixel{i}" for i in range(64)]


@pytest.fixture
def client(served):
    with TestClient(create_app(get_settings())) as c:
        yield c


@pytest.fixture
def pyfunc(served):
    return mlflow.pyfunc.load_model(f"models:/{get_settings().model_name}/1")


def _labels(records: list[dict]) -> list[int]:
    return [r["label"] for r in records]


def _csv(frame: pd.DataFrame, header: bool = True) -> bytes:
    out = io.StringIO()
    frame.to_csv(out, index=False, header=header)
    return out.getvalue().encode()


def test_ping_and_version_answer_like_mlflows_server(client):
    ping = client.get("/ping")
    assert ping.status_code == 200 and ping.headers["content-type"].startswith("text/plain")
    version = client.get("/version")
    assert version.status_code == 200 and version.text == mlflow.__version__


def test_invocations_takes_csv_with_a_header_in_any_order(client, pyfunc, digits_rows):
    rows = digits_rows[:5]
    expected = _labels(pyfunc.predict(pd.DataFrame(rows, columns=NAMES)).to_dict("records"))
    ints = pd.DataFrame(rows.astype(np.int64), columns=NAMES)  # a pixel CSV as users have it
    shuffled = ints[NAMES[::-1]]
    shuffled.insert(0, "image_id", range(5))  # an extra column is ignored
    for body in (_csv(ints), _csv(shuffled), _csv(ints, header=False)):
        res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
        assert res.status_code == 200, res.text
        assert _labels(res.json()["predictions"]) == expected
        assert res.headers["x-model-version"] == "1"
    logged = PredictionStore(get_settings().prediction_db).count()
    assert logged == 15  # CSV rows are logged like any other


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty body"),
        (b"\xff\xfe", 400, "not UTF-8"),
        ((b"pixel0,pixel1\n1,2\n"), 422, "missing column"),
        ((",".join(NAMES) + "\n" + ",".join(["1"] * 63) + "\n").encode(), 422, "cells"),
        ((",".join(NAMES) + "\n" + ",".join(["x"] * 64) + "\n").encode(), 422, "number"),
        ((",".join(NAMES) + "\n" + ",".join(["nan"] * 64) + "\n").encode(), 422, "finite"),
        ((",".join(NAMES) + "\n").encode(), 422, "no rows"),
    ],
)
def test_bad_csv_says_what_is_wrong(client, body, status, message):
    res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert res.status_code == status, res.text
    assert message in res.json()["detail"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


@pytest.mark.slow
@pytest.mark.integration
def test_mlflows_own_client_scores_against_the_server(live_server, pyfunc, digits_rows):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    server = live_server()
    scoring = ScoringServerClient("127.0.0.1", server.port)
    scoring.wait_server_ready(timeout=30)
    assert scoring.get_version() == mlflow.__version__
    frame = pd.DataFrame(digits_rows[:6], columns=NAMES)
    expected = _labels(pyfunc.predict(frame).to_dict("records"))
    for data in (frame, frame[NAMES[::-1]], digits_rows[:6]):
        answer = scoring.invoke(data, params={"ignored": 1})
        got = answer.get_predictions()
        assert got["label"].tolist() == expected


@pytest.mark.slow
def test_mlflow_models_predict_takes_integer_and_float_csvs(served, pyfunc, digits_rows, tmp_path):
    """The logged signature is one users' files satisfy: pandas reads a pixel CSV as int64
    (or float64), which a float32 column type refused."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    rows = digits_rows[:8]
    expected = _labels(pyfunc.predict(pd.DataFrame(rows, columns=NAMES)).to_dict("records"))
    settings = get_settings()
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    for name, frame in (
        ("ints.csv", pd.DataFrame(rows.astype(np.int64), columns=NAMES)),
        ("floats.csv", pd.DataFrame(rows.astype(np.float64) + 0.25, columns=NAMES).round(2)),
    ):
        source, out = tmp_path / name, tmp_path / f"{name}.json"
        frame.to_csv(source, index=False)
        done = subprocess.run(
            [mlflow_cli, "models", "predict", "-m", f"models:/{settings.model_name}/1"]
            + ["-i", str(source), "-t", "csv", "-o", str(out), "--env-manager", "local"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(out.read_text())["predictions"]
        want = _labels(pyfunc.predict(frame).to_dict("records"))
        assert _labels(got) == want
        if name == "ints.csv":
            assert want == expected
