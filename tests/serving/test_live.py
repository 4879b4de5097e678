"""A real `mlops serve` process on loopback: hot swap under load, several workers, a streamed
oversized body, graceful shutdown. (kill -9 under load: tests/reliability/test_faults.py.)"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import httpx
import mlflow
import pytest
import sqlalchemy as sa

from pipeline.config import get_settings
from pipeline.registry import CHAMPION
from pipeline.store import PredictionStore
from pipeline.tracking import configure_tracking
from tests.serving.helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _register_copy_of_v1(settings) -> str:
    """A second version (same weights) registered and made champion, as a promotion would."""
    configure_tracking(settings)
    client = mlflow.MlflowClient()
    v1 = client.get_model_version(settings.model_name, "1")
    v2 = mlflow.register_model(v1.source, settings.model_name, tags=v1.tags)
    client.set_registered_model_alias(settings.model_name, CHAMPION, v2.version)
    return str(v2.version)


def _load(url: str, rows, stop: threading.Event, out: list, prefix: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        n = 0
        while not stop.is_set():
            pid = f"{prefix}-{n}"
            try:
                res = http.post("/predict", json={"instances": [rows[n % len(rows)]], "ids": [pid]})
                out.append(
                    (
                        pid,
                        res.status_code,
                        res.headers.get("x-model-version"),
                        res.json().get("model_version"),
                    )
                )
            except httpx.HTTPError as exc:
                out.append((pid, type(exc).__name__, None, None))
            n += 1


def test_hot_swap_under_load_drops_nothing(served, live_server, digits_rows):
    server = live_server(env={"MLOPS_RELOAD_INTERVAL_S": "0.3"})
    rows = digits_rows[:50].tolist()
    stop, results = threading.Event(), []
    threads = [
        threading.Thread(target=_load, args=(server.url, rows, stop, results, f"t{i}"))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 50, timeout=30)  # v1 answers under load
    new = _register_copy_of_v1(get_settings())
    wait_until(lambda: httpx.get(server.url + "/model").json()["model_version"] == new, 30)
    wait_until(lambda: sum(r[2] == new for r in results) >= 50, timeout=30)  # and then v2
    stop.set()
    for t in threads:
        t.join()

    assert results and all(r[1] == 200 for r in results), [r for r in results if r[1] != 200][:5]
    assert all(r[2] == r[3] for r in results)  # header and body name the same version
    versions = [r[2] for r in results]
    assert versions[0] == "1" and versions[-1] == new and set(versions) == {"1", new}
    stored = PredictionStore(get_settings().prediction_db).get([r[0] for r in results])
    assert {pid: row["model_version"] for pid, row in stored.items()} == {
        r[0]: r[2] for r in results
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_log_each_id_exactly_once(served, live_server, digits_rows, backend, request):
    url = get_settings().prediction_db if backend == "sqlite" else request.getfixturevalue("pg_url")
    server = live_server(workers=2, env={"MLOPS_PREDICTION_DB_URL": url})
    ids = [f"w-{i}" for i in range(60)]
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _attempt in range(2):  # every request sent twice: the retry must not duplicate
            for i, pid in enumerate(ids):
                res = http.post(
                    "/predict",
                    json={"instances": [digits_rows[i].tolist()], "ids": [pid]},
                    headers={"connection": "close"},
                )
                assert res.status_code == 200, res.text
        metrics = http.get("/metrics").text
    assert PredictionStore(url).count() == 60
    assert "mlops_predictions_logged_total" in metrics
    # each worker was told how many share the log (it spreads its checkpoints by that)
    assert _workers_told(server.process.pid) == 2


def _workers_told(group: int) -> int:
    """The server's workers (processes multiprocessing spawned in its process group) whose
    environment says MLOPS_SERVE_WORKERS=2."""
    told = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != group:
                continue
            if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # the server itself, or multiprocessing's resource tracker
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        told += b"MLOPS_SERVE_WORKERS=2" in environ
    return told


def test_another_process_holding_the_write_lock_never_stalls_the_server(
    served, live_server, digits_rows
):
    """Another process's commit (a second worker, a label import, `mlops feedback`) holds
    the log's write lock: a prediction whose row must be committed first waits for it on
    the writer thread, while the event loop goes on serving (it once waited inside SQLite,
    which sleeps 1, 2, 5 ms and more between tries, for up to 10 s: /health hung too)."""
    url = get_settings().prediction_db
    server = live_server()
    row = digits_rows[0].tolist()
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/predict", json={"instances": [row], "ids": ["before"]}).is_success
        other = sqlite3.connect(sa.engine.make_url(url).database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, held until we let go
        try:
            waiting = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(
                        f"{server.url}/predict",
                        json={"instances": [row], "ids": ["during"]},
                        timeout=30,
                    )
                )
            )
            waiting.start()
            wait_until(lambda: _passes(http) >= 2, timeout=10)  # scored: its commit is due
            assert http.get("/health", timeout=3).status_code == 200  # the loop is free
            assert waiting.is_alive() and not answers  # durable: no answer before its commit
        finally:
            other.rollback()
            other.close()
        waiting.join(15)
    assert answers and answers[0].status_code == 200, answers
    assert set(PredictionStore(url).get(["before", "during"])) == {"before", "during"}


def _passes(http: httpx.Client) -> float:
    """Forward passes the server has run, from its /metrics (a stalled loop answers none)."""
    for line in http.get("/metrics", timeout=3).text.splitlines():
        if line.startswith("mlops_batch_rows_count"):
            return float(line.split()[-1])
    return 0.0


def test_graceful_shutdown_drains_the_async_log(served, live_server, digits_rows):
    """async mode answers before the commit; a SIGTERM still writes every answered row."""
    server = live_server(env={"MLOPS_LOG_MODE": "async"}, args=["--access-log"])
    ids = [f"d-{i}" for i in range(300)]
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for start in range(0, len(ids), 20):
            res = http.post(
                "/predict",
                json={
                    "instances": digits_rows[start : start + 20].tolist(),
                    "ids": ids[start : start + 20],
                },
            )
            assert res.status_code == 200
    server.stop()  # SIGTERM: uvicorn's graceful shutdown runs the lifespan's drain
    assert server.returncode is not None
    assert server.logs().count('"POST /predict HTTP/1.1" 200') >= 5  # --access-log
    assert set(PredictionStore(get_settings().prediction_db).get(ids)) == set(ids)


def test_streamed_body_over_the_limit_is_413_and_the_server_keeps_serving(
    served, live_server, digits_rows
):
    """A chunked body (no Content-Length) is counted as it arrives: refused with a JSON 413
    once it passes MLOPS_MAX_BODY_BYTES, without reading the rest; nothing is logged."""
    limit = 64 * 1024
    server = live_server(env={"MLOPS_MAX_BODY_BYTES": str(limit)})
    chunk = b"0," * 8192  # 16 KiB

    def body():
        yield b'{"instances": [['
        for _ in range(4 * limit // len(chunk)):
            yield chunk
        yield b"0]]}"

    before = PredictionStore(get_settings().prediction_db).count()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        res = http.post("/predict", content=body(), headers={"content-type": "application/json"})
        assert "content-length" not in res.request.headers
        assert res.request.headers["transfer-encoding"] == "chunked"
        assert res.status_code == 413, res.text
        assert res.json() == {"detail": f"body larger than {limit} bytes"}
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/predict", json={"instances": digits_rows[:1].tolist()})
    assert ok.status_code == 200
    assert PredictionStore(get_settings().prediction_db).count() == before + 1
