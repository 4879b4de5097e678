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


# --- Open Inference Protocol (V2) -----------------------------------------------------------


def _v2(rows: np.ndarray, **extra) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
    return {"inputs": [{**tensor, "data": rows.ravel().tolist()}], **extra}


def test_v2_health_and_metadata(client):
    name = get_settings().model_name
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "label": [-1],
        "probabilities": [-1, 10],
    }
    assert client.get(f"/v2/models/{name}/versions/1").status_code == 200
    unknown = client.get("/v2/models/other-model")
    assert unknown.status_code == 404 and "other-model" in unknown.json()["error"]
    # the framework's own refusals under /v2 are in V2's shape too (they said only detail)
    nowhere = client.get("/v2/no/such/route")
    assert nowhere.status_code == 404 and nowhere.json()["error"] == "Not Found"
    wrong = client.post("/v2/health/live")
    assert wrong.status_code == 405 and wrong.json()["error"] == "Method Not Allowed"
    assert "GET" in wrong.headers["allow"]
    assert client.get("/no/such/route").json() == {"detail": "Not Found"}  # elsewhere as before
    assert client.get(f"/v2/models/{name}/versions/7/ready").status_code == 404


def test_v2_infer_answers_like_the_pyfunc_and_logs_each_row(client, pyfunc, digits_rows):
    rows = digits_rows[:3]
    expected = pyfunc.predict(pd.DataFrame(rows, columns=NAMES))
    name = get_settings().model_name
    flat = client.post(f"/v2/models/{name}/infer", json=_v2(rows, id="req-7"))
    assert flat.status_code == 200, flat.text
    body = flat.json()
    assert body["id"] == "req-7" and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == expected["label"].tolist()
    assert outputs["probabilities"]["shape"] == [3, 10]
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(3, 10),
        expected[[f"prob_{k}" for k in range(10)]].to_numpy(),
        atol=1e-6,
    )
    assert body["parameters"]["ids"] == "req-7-0,req-7-1,req-7-2"

    # nested data, integer datatype, the client's own ids, one output asked for
    nested = {
        "inputs": [
            {
                "name": "input",
                "datatype": "INT64",
                "shape": [2, 64],
                "data": rows[:2].astype(int).tolist(),
            }
        ],
        "parameters": {"ids": ["mine-a", "mine-b"]},
        "outputs": [{"name": "label"}],
    }
    res = client.post(f"/v2/models/{name}/versions/1/infer", json=nested)
    assert res.status_code == 200, res.text
    assert [o["name"] for o in res.json()["outputs"]] == ["label"]
    logged = PredictionStore(get_settings().prediction_db).get(
        ["req-7-0", "req-7-1", "req-7-2", "mine-a", "mine-b"]
    )
    assert len(logged) == 5 and logged["req-7-1"]["label"] == expected["label"][1]
    labelled = client.post("/feedback", json={"labels": [{"id": "mine-a", "label": 3}]})
    assert labelled.json()["counts"] == {"labelled": 1}


def test_v2_binary_tensors_in_and_out(client, pyfunc, digits_rows):
    rows = digits_rows[:4]
    expected = pyfunc.predict(pd.DataFrame(rows, columns=NAMES))
    raw = rows.astype("<f4").tobytes()
    head = _dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [4, 64],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    res = client.post(
        f"/v2/models/{get_settings().model_name}/infer",
        content=head + raw,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )
    assert res.status_code == 200, res.text
    size = int(res.headers["inference-header-content-length"])
    meta = _loads(res.content[:size])
    blob = res.content[size:]
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    labels = np.frombuffer(blob[: sizes[0]], dtype="<i8")
    probs = np.frombuffer(blob[sizes[0] :], dtype="<f4").reshape(4, 10)
    assert labels.tolist() == expected["label"].tolist()
    np.testing.assert_allclose(
        probs, expected[[f"prob_{k}" for k in range(10)]].to_numpy(), atol=1e-6
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [2, 64]}, "needs 128 values"),
        ({"shape": [1, 63], "data": [0.0] * 63}, "64 features"),
        ({"datatype": "BYTES"}, "not numeric"),
        ({"name": "pixels"}, "unknown input"),
        ({"data": [True] * 64}, "booleans"),
        ({"shape": [2, 64], "data": [[0.0] * 64, [0.0] * 63 + [False]]}, "booleans"),
        ({"data": [1e300] * 64}, "finite"),
        ({"data": "zeros"}, "flat or nested list"),
    ],
)
def test_v2_bad_requests_say_what_is_wrong(client, digits_rows, change, message):
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    tensor["data"] = digits_rows[0].tolist()
    tensor.update(change)
    res = client.post(
        f"/v2/models/{get_settings().model_name}/infer",
        content=_dumps({"inputs": [tensor]}, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


def _dumps(obj, allow_nan: bool = False) -> bytes:
    import json

    return json.dumps(obj, allow_nan=allow_nan).encode()


def _loads(raw: bytes):
    import json

    return json.loads(raw)


@pytest.mark.slow
@pytest.mark.integration
def test_tritonclient_talks_to_the_server(live_server, pyfunc, digits_rows):
    """The Triton/KServe client library, unmodified, against a real `mlops serve`."""
    import tritonclient.http as triton

    server = live_server()
    name = get_settings().model_name
    rows = digits_rows[:5]
    expected = pyfunc.predict(pd.DataFrame(rows, columns=NAMES))
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as tc:
        assert tc.is_server_live() and tc.is_server_ready()
        assert tc.is_model_ready(name)
        assert tc.get_model_metadata(name)["inputs"][0]["shape"] == [-1, 64]
        for binary in (True, False):
            tensor = triton.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
            outputs = [
                triton.InferRequestedOutput("label", binary_data=binary),
                triton.InferRequestedOutput("probabilities", binary_data=binary),
            ]
            result = tc.infer(name, [tensor], outputs=outputs, request_id=f"tc-{binary}")
            assert result.as_numpy("label").tolist() == expected["label"].tolist()
            np.testing.assert_allclose(
                result.as_numpy("probabilities"),
                expected[[f"prob_{k}" for k in range(10)]].to_numpy(),
                atol=1e-6,
            )
        default = tc.infer(name, [tensor])  # no outputs named: all of them, binary
        assert default.as_numpy("label").tolist() == expected["label"].tolist()
        with pytest.raises(Exception, match="unknown model"):
            tc.infer("no-such-model", [tensor])
    logged = PredictionStore(get_settings().prediction_db).get(["tc-True-0", "tc-False-4"])
    assert len(logged) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parameters": 5}, "parameters must be an object"),
        ({"parameters": [1]}, "parameters must be an object"),
        ({"parameters": {"binary_data_output": "yes"}}, "must be true or false"),
        ({"tensor": {"parameters": 5}}, "inputs[0].parameters must be an object"),
        ({"tensor": {"parameters": "binary_data_size"}}, "inputs[0].parameters must be"),
        ({"outputs": 5}, "outputs must be a list"),
        ({"outputs": {"name": "label"}}, "outputs must be a list"),
        ({"outputs": ["label"]}, "outputs[0] must be an object"),
        ({"outputs": [{"name": "foo"}]}, "unknown output 'foo'"),
        ({"outputs": [{"name": ["label"]}]}, "unknown output"),
        ({"outputs": [{"name": "label"}, {"name": "label"}]}, "asked for twice"),
        ({"outputs": [{"name": "label", "parameters": [1]}]}, "outputs[0].parameters must"),
        ({"outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, "true or false"),
    ],
)
def test_v2_bad_parameters_and_outputs_are_refused_before_anything_is_logged(
    client, digits_rows, change, message
):
    """Outputs are checked with the inputs, before inference: a request refused for what it
    asks back has logged no rows (they were logged, then the answer failed)."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    tensor |= {"data": digits_rows[0].tolist(), **change.get("tensor", {})}
    body = {"inputs": [tensor]} | {k: v for k, v in change.items() if k != "tensor"}
    res = client.post(f"/v2/models/{get_settings().model_name}/infer", json=body)
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


@pytest.mark.parametrize(
    "data",
    [["1"] * 64, [0.0] * 63 + ["2"], [[0.0] * 63 + ["1e3"]], [None] * 64],
    ids=["strings", "one string", "nested string", "nulls"],
)
def test_v2_json_data_must_be_numbers_not_strings_of_them(client, data):
    """As /predict refuses them: NumPy would read "1" as 1.0 when told the dtype."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": data}
    res = client.post(f"/v2/models/{get_settings().model_name}/infer", json={"inputs": [tensor]})
    assert res.status_code == 400, res.text
    assert "must be numbers" in res.json()["error"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


def test_v2_bytes_after_the_json_header_need_a_binary_input(client, digits_rows):
    """With no input in binary, the bytes after Inference-Header-Content-Length belong to
    nothing: a client that meant them as the tensor must hear so, not get a JSON answer."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    head = _dumps({"inputs": [{**tensor, "data": digits_rows[0].tolist()}]})
    res = client.post(
        f"/v2/models/{get_settings().model_name}/infer",
        content=head + digits_rows[0].astype("<f4").tobytes(),
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )
    assert res.status_code == 400, res.text
    assert "256 bytes after the" in res.json()["error"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"parameters": {"ids": ["a,b", "c"]}}, "parameters.ids[0] holds a comma"),
        ({"id": "req,7"}, "the request id holds a comma"),
    ],
)
def test_v2_row_ids_cannot_hold_the_comma_the_answer_joins_them_with(
    client, digits_rows, extra, message
):
    """parameters.ids comes back as one comma-joined string: "a,b" and "c" would read back
    as three ids, and /feedback would find none of the first two."""
    rows = digits_rows[:2]
    res = client.post(f"/v2/models/{get_settings().model_name}/infer", json=_v2(rows, **extra))
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]
    assert PredictionStore(get_settings().prediction_db).count() == 0
    # /predict answers ids in a list: a comma is fine there
    res = client.post("/predict", json={"instances": rows.tolist(), "ids": ["a,b", "c"]})
    assert res.status_code == 200, res.text
    assert [p["id"] for p in res.json()["predictions"]] == ["a,b", "c"]


@pytest.mark.parametrize("fast", [True, False])
def test_v2_refusals_before_the_route_answer_in_v2s_error_shape(
    served, monkeypatch, digits_rows, fast
):
    """tritonclient reads `error`: the API key (401), the body limit (413) and a store that
    is down (503) are answered outside the V2 route's own checks, and said only `detail`."""
    monkeypatch.setenv("MLOPS_FAST_PATH", str(fast).lower())
    monkeypatch.setenv("MLOPS_API_KEY", "the-key")
    monkeypatch.setenv("MLOPS_MAX_BODY_BYTES", "65536")
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", "postgresql://mlops@127.0.0.1:1/none")
    get_settings.cache_clear()
    url = f"/v2/models/{get_settings().model_name}/infer"
    key = {"x-api-key": "the-key"}
    with TestClient(create_app(get_settings())) as c:
        answers = {
            401: c.post(url, json=_v2(digits_rows[:1])),
            413: c.post(url, content=b" " * 70_000, headers=key),
            503: c.post(url, json=_v2(digits_rows[:1]), headers=key),
        }
        assert c.post("/predict", json={"instances": [[0.0] * 64]}).json().keys() == {"detail"}
    get_settings.cache_clear()
    for status, res in answers.items():
        assert res.status_code == status, res.text
        body = res.json()
        assert body["error"] and body["error"] == body["detail"], body
    assert "prediction store unavailable" in answers[503].json()["error"]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_csv_lines_may_end_as_pandas_reads_them(client, pyfunc, digits_rows, ending):
    """CR-only files (old Mac exports) and a bare CR between rows answered 500."""
    rows = digits_rows[:3]
    expected = pyfunc.predict(pd.DataFrame(rows, columns=NAMES))["label"].tolist()
    lines = [",".join(NAMES), *(",".join(map(str, row)) for row in rows)]
    body = ending.join(lines) + ending
    res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert res.status_code == 200, res.text
    assert _labels(res.json()["predictions"]) == expected
    # a stray CR ends a row, as in pandas: here it cuts the first row in two
    body = "\n".join([lines[0], lines[1].replace(",", "\r", 1), lines[2]]) + "\n"
    res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert res.status_code == 422 and "cells" in res.json()["detail"], res.text


def test_a_csv_cell_too_long_for_any_number_is_a_400(client):
    """Over the csv module's field limit (131,072 characters) it raised, a 500."""
    body = ",".join(NAMES) + "\n" + "1" * 200_000 + ",1" * 63 + "\n"
    res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert res.status_code == 400, res.text
    assert "CSV cannot be parsed: field larger than field limit" in res.json()["detail"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


def test_a_feature_column_named_twice_is_refused_not_taken_from_the_last(client, digits_rows):
    """Two pixel3 columns: which one the client meant is unknowable (the last one was
    scored). Columns the model does not read may repeat: they are ignored anyway."""
    row = [str(v) for v in digits_rows[0]]
    csv_body = ",".join([*NAMES, "pixel3"]) + "\n" + ",".join([*row, "0"]) + "\n"
    split = {"columns": [*NAMES, "pixel3"], "data": [[*digits_rows[0].tolist(), 0.0]]}
    for res in (
        client.post("/invocations", content=csv_body, headers={"content-type": "text/csv"}),
        client.post("/invocations", json={"dataframe_split": split}),
    ):
        assert res.status_code == 422, res.text
        assert "pixel3 is named twice" in res.json()["detail"]
    assert PredictionStore(get_settings().prediction_db).count() == 0
    extra = ",".join([*NAMES, "note", "note"]) + "\n" + ",".join([*row, "1", "2"]) + "\n"
    res = client.post("/invocations", content=extra, headers={"content-type": "text/csv"})
    assert res.status_code == 200, res.text


@pytest.mark.parametrize("cell", ["1_000", "١٢", "１"], ids=["underscores", "arabic", "fullwidth"])
def test_csv_cells_are_numbers_as_pandas_reads_them_not_as_python_does(client, cell):
    """Python's float() takes digit groups ("1_000" is 1000.0) and any script's digits;
    pandas, and so MLflow's own server, reads such a column as text."""
    body = ",".join(NAMES) + "\n" + ",".join([cell] + ["0"] * 63) + "\n"
    res = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert res.status_code == 422, res.text
    assert "every cell must be a number" in res.json()["detail"]
    assert repr(cell) in res.json()["detail"]
    assert PredictionStore(get_settings().prediction_db).count() == 0


def test_v2_a_request_id_too_long_for_its_row_ids_says_it_is_the_request_id(client, digits_rows):
    """127 characters is an id, but `{id}-0` is not: the error named parameters.ids, which
    the request did not send."""
    rows = digits_rows[:2]
    res = client.post(f"/v2/models/{get_settings().model_name}/infer", json=_v2(rows, id="x" * 127))
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error.startswith("the request id makes row ids") and "parameters.ids instead" in error
    assert PredictionStore(get_settings().prediction_db).count() == 0
