"""Faults: what the user sees, and that nothing acknowledged is lost.

(Two more faults are tested where their machinery lives: a new champion promoted under load
in tests/serving/test_live.py::test_hot_swap_under_load_drops_nothing, and two feedback
pulls at once in tests/pipeline/test_feedback.py::test_two_pulls_at_once_duplicate_nothing.)
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import mlflow
import pytest

from pipeline.config import get_settings
from pipeline.registry import CHAMPION, alias_version
from pipeline.store import PredictionStore
from pipeline.tracking import configure_tracking
from serving.loadgen import LoadResult, run_load
from tests.reliability.tcpproxy import TcpProxy
from tests.serving.conftest import LiveServer, free_port
from tests.serving.helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def test_kill_9_under_load_then_restart(served, live_server, digits_rows):
    """kill -9 mid-load (1-row and batched requests from 6 clients): after a restart, every
    acknowledged prediction is in the store."""
    server = live_server()
    stop, result = threading.Event(), LoadResult()
    worker = threading.Thread(
        target=run_load,
        args=(server.url, digits_rows.tolist(), digits_rows[:, 0].tolist(), 100_000, 6),
        kwargs={"send_labels": False, "stop": stop, "prefix": "k9", "result": result},
    )
    worker.start()
    try:
        wait_until(lambda: len(result.acknowledged) > 100, timeout=60)
        server.kill9()  # mid-load, no graceful shutdown
    finally:
        stop.set()
        worker.join()
    acknowledged = list(result.acknowledged)
    assert '"POST /predict' not in server.logs()  # no access log unless asked for
    restarted = live_server()  # the store opens cleanly after the crash
    assert httpx.get(restarted.url + "/ready").status_code == 200
    store = PredictionStore(get_settings().prediction_db)
    assert set(store.get(acknowledged)) == set(acknowledged)  # every 200 is stored


def _broken_version(settings, how: str) -> str:
    """Register a version whose artifact is corrupt (`broken`) or gone (`missing`)."""
    configure_tracking(settings)
    client = mlflow.MlflowClient()
    v1 = client.get_model_version(settings.model_name, "1")
    local = mlflow.artifacts.download_artifacts(
        f"models:/{settings.model_name}/1", dst_path=str(settings.root / "broken-src")
    )
    if how == "broken":
        ckpt = next((settings.root / "broken-src").rglob("checkpoint.pt"))
        ckpt.write_bytes(b"not a checkpoint")
    run = client.create_run(mlflow.get_experiment_by_name(settings.model_name).experiment_id)
    client.log_artifacts(run.info.run_id, local, "model")
    source = f"{run.info.artifact_uri}/model"
    if how == "missing":
        source = source + "-does-not-exist"
    mv = client.create_model_version(settings.model_name, source, run.info.run_id, tags=v1.tags)
    return str(mv.version)


@pytest.mark.parametrize("how", ["broken", "missing"])
def test_broken_champion_keeps_the_old_model_serving(served, live_server, digits_rows, how):
    server = live_server(env={"MLOPS_RELOAD_INTERVAL_S": "0.5"})
    settings = get_settings()
    bad = _broken_version(settings, how)
    mlflow.MlflowClient().set_registered_model_alias(settings.model_name, CHAMPION, bad)

    def load_failed() -> dict | None:
        info = httpx.get(server.url + "/model").json()
        return info if info["last_load_error"] else None

    info = wait_until(load_failed, timeout=20)
    assert info["model_version"] == "1" and "@champion" in info["last_load_error"]
    assert httpx.get(server.url + "/ready").json()["ready"] is True
    res = httpx.post(server.url + "/predict", json={"instances": digits_rows[:2].tolist()})
    assert res.status_code == 200 and res.headers["x-model-version"] == "1"
    assert "mlops_model_load_failures_total" in httpx.get(server.url + "/metrics").text
    shutil.rmtree(settings.root / "broken-src", ignore_errors=True)


def test_postgres_outage_fails_fast_and_recovers(served, live_server, digits_rows, pg_url):
    """The database path is cut and restored by a TCP proxy (the machine's PostgreSQL is
    shared, so it is not restarted for real): what the API sees is the same."""
    port = free_port()
    proxy = TcpProxy(port, 5432)
    proxy.start()
    via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    try:
        server = live_server(env={"MLOPS_PREDICTION_DB_URL": via_proxy})
        acked = []

        def predict(pid: str) -> httpx.Response:
            return httpx.post(
                server.url + "/predict",
                timeout=30,
                json={"instances": [digits_rows[0].tolist()], "ids": [pid]},
            )

        for i in range(20):
            res = predict(f"before-{i}")
            assert res.status_code == 200
            acked.append(f"before-{i}")
        proxy.stop()  # the database goes away
        outage = []
        for i in range(5):
            start = time.monotonic()
            res = predict(f"during-{i}")
            outage.append((res.status_code, time.monotonic() - start, res.json()))
        assert all(status == 503 for status, _, _ in outage), outage
        assert all(seconds < 10 for _, seconds, _ in outage)
        assert "prediction store unavailable" in outage[0][2]["detail"]
        assert httpx.get(server.url + "/health").status_code == 200
        proxy.start()  # and comes back: the server recovers by itself

        def recovered() -> bool:
            pid = f"after-{len(acked)}"
            if predict(pid).status_code != 200:
                return False
            acked.append(pid)
            return True

        wait_until(recovered, timeout=30, interval=0.5)
        store = PredictionStore(pg_url)
        try:
            assert set(store.get(acked)) == set(acked)
            assert not store.get([f"during-{i}" for i in range(5)])  # refused: not logged
        finally:
            store.dispose()
    finally:
        proxy.close()


def test_mlflow_down_during_retraining(prefect_api, loop_project, monkeypatch):
    """The retraining flow retries, then fails with a clear message; the champion and the
    running server are untouched."""
    from flows.loop import loop_flow

    monkeypatch.setenv("MLOPS_RELOAD_INTERVAL_S", "0")
    loop_flow(rounds=1, source="digits", trials=0, epochs=2)
    settings = get_settings()
    server = LiveServer(loop_project).start()
    try:
        _retrain_without_mlflow(settings, server, monkeypatch)
    finally:
        server.stop()


def _retrain_without_mlflow(settings, server, monkeypatch) -> None:
    from flows.retrain import retrain_flow

    before = httpx.get(server.url + "/model").json()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    get_settings.cache_clear()
    start = time.monotonic()
    state = retrain_flow(reason="test", trials=0, epochs=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"MLflow at http://127\.0\.0\.1:9 is unreachable"):
        state.result()
    assert time.monotonic() - start < 120

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    get_settings.cache_clear()
    configure_tracking(get_settings())
    assert alias_version(settings.model_name, CHAMPION) == "1"
    assert httpx.get(server.url + "/model").json() == before
    res = httpx.post(server.url + "/predict", json={"instances": [[0.0] * 64]})
    assert res.status_code == 200 and res.json()["model_version"] == "1"


def test_training_crash_mid_way_leaves_nothing_half_registered(
    prefect_api, loop_project, monkeypatch
):
    from flows.loop import loop_flow
    from flows.retrain import retrain_flow
    from pipeline.tracking import EpochLogger

    monkeypatch.setenv("MLOPS_RELOAD_INTERVAL_S", "0")
    loop_flow(rounds=1, source="digits", trials=0, epochs=2)
    settings = get_settings()
    log_epoch = EpochLogger.__call__

    def crash_in_epoch_2(self, epoch: int, metrics: dict) -> None:
        log_epoch(self, epoch, metrics)
        if epoch == 2:  # the training loop's per-epoch hook: as if epoch 2 died mid-way
            raise RuntimeError("injected fault in epoch 2")

    monkeypatch.setattr(EpochLogger, "__call__", crash_in_epoch_2)
    state = retrain_flow(reason="crash test", trials=0, epochs=4, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="injected fault in epoch 2"):
        state.result()
    client = mlflow.MlflowClient()
    assert [
        str(v.version) for v in client.search_model_versions(f"name='{settings.model_name}'")
    ] == ["1"]
    failed = [
        r
        for r in mlflow.search_runs(experiment_names=[settings.model_name], output_format="list")
        if r.info.status == "FAILED"
    ]
    assert len(failed) == 1  # the crashed run is marked, not left RUNNING

    monkeypatch.undo()
    monkeypatch.setenv("MLOPS_ROOT", str(settings.root))
    monkeypatch.setenv("MLOPS_RELOAD_INTERVAL_S", "0")
    get_settings.cache_clear()
    summary = retrain_flow(reason="after the crash", trials=0, epochs=2)
    assert summary["model_version"] == "2"
