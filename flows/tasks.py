"""Prefect tasks: each wraps one pipeline/ step, with retries on I/O and readable run names."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}


def _logger():
    """Prefect's run logger inside a run; a plain logger when a task's .fn is called directly."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("flows")


def _context():
    from pipeline.config import get_settings, load_params

    settings = get_settings()
    return settings, load_params(settings.params_path)


# --- data source --------------------------------------------------------------------------------


@task(task_run_name="ingest {source}", cache_policy=NO_CACHE)
def ingest_bootstrap(source: str) -> dict:
    """Source -> data/loop/bootstrap.parquet (validated; bad rows quarantined)."""
    from pipeline.feedback import BOOTSTRAP
    from pipeline.ingest import ingest
    from pipeline.lineage import ensure_dvc_repo

    settings, params = _context()
    ensure_dvc_repo(settings.root)
    report = ingest(
        source,
        settings.loop_dir,
        settings.quarantine_dir,
        params,
        name=BOOTSTRAP.removesuffix(".parquet"),
    )
    _logger().info(
        "%d rows from %s (%d quarantined)", report.rows_ok, source, report.rows_quarantined
    )
    return report.to_dict()


@task(task_run_name="version data (dvc add + push)", cache_policy=NO_CACHE, **IO_RETRIES)
def version_data() -> str:
    from pipeline.lineage import version_data as dvc_version

    settings, _ = _context()
    digest = dvc_version(settings.root, settings.loop_dir)
    _logger().info("data version %s", digest)
    return digest


# --- data processing ----------------------------------------------------------------------------


@task(task_run_name="preprocess data {data_hash:.10}", cache_policy=NO_CACHE)
def preprocess_data(data_hash: str) -> dict:
    """Split (fixed test split) and fit the preprocessor; cached by data hash."""
    from pipeline.feedback import training_frames
    from pipeline.preprocess import preprocess_frames

    settings, params = _context()
    bootstrap, feedback = training_frames(settings.loop_dir)
    return preprocess_frames(bootstrap, settings.processed_dir, params, data_hash, feedback)


# --- training + optimisation --------------------------------------------------------------------


@task(task_run_name="tune + train round {round_no}", cache_policy=NO_CACHE)
def train_model(round_no: int, trials: int, epochs: int | None, warm_start: bool) -> dict:
    """Optuna search, then the final model: evaluated, logged and registered in MLflow."""
    from pipeline.experiment import fit

    settings, params = _context()
    cand = fit(
        settings,
        params,
        trials=trials,
        epochs=epochs,
        warm_start=warm_start,
        run_name=f"round-{round_no}",
        show_progress=False,
    )
    return {
        "version": cand.version,
        "run_id": cand.run_id,
        "accuracy": cand.metrics["accuracy"],
        "macro_f1": cand.metrics["macro_f1"],
    }


@task(task_run_name="promote v{version} if better", cache_policy=NO_CACHE, **IO_RETRIES)
def promote(version: str) -> dict:
    from pipeline.experiment import raw_test_set
    from pipeline.preprocess import Preprocessor
    from pipeline.registry import promote_if_better

    settings, params = _context()
    pre = Preprocessor.load(settings.processed_dir / "preprocessor.json")
    x, y = raw_test_set(settings, pre.schema)
    d = promote_if_better(settings, version, x, y, params.get("promote", {}).get("margin", 0.0))
    _logger().info("v%s %s: %s", version, "promoted" if d.promoted else "not promoted", d.reason)
    return {"promoted": d.promoted, "champion_score": d.champion_score, "reason": d.reason}


# --- deployment ---------------------------------------------------------------------------------


@dataclass
class ApiServer:
    proc: subprocess.Popen | None  # None: a server this flow did not start
    url: str
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@task(task_run_name="start API server", cache_policy=NO_CACHE)
def start_api() -> ApiServer:
    """A real `mlops serve` process on a free loopback port, following the champion; or the
    running server named by MLOPS_API_URL (production topology)."""
    settings, _ = _context()
    if settings.api_url:
        if settings.admin_token is None:
            raise RuntimeError("MLOPS_API_URL is set: MLOPS_ADMIN_TOKEN must be too")
        _logger().info("using the running API server at %s", settings.api_url)
        return ApiServer(
            None, settings.api_url.rstrip("/"), settings.admin_token.get_secret_value()
        )
    port, token = _free_port(), secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "MLOPS_ROOT": str(settings.root),
        "MLOPS_ADMIN_TOKEN": token,
        "MLOPS_RELOAD_INTERVAL_S": os.environ.get("MLOPS_RELOAD_INTERVAL_S", "5"),
    }
    log = open(settings.root / "data" / "api-server.log", "ab")  # noqa: SIM115
    mlops = str(Path(sys.executable).parent / "mlops")
    proc = subprocess.Popen(
        [mlops, "serve", "--port", str(port)],
        cwd=settings.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the API server exited ({proc.returncode}): see data/api-server.log"
            )
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                _logger().info("API server on %s (pid %d)", url, proc.pid)
                return ApiServer(proc, url, token)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError("the API server did not start within 120 s")


@task(task_run_name="deploy champion to the API", cache_policy=NO_CACHE, **IO_RETRIES)
def deploy(server: ApiServer) -> str:
    """Hot-swap the running server to the current champion; returns the version it serves."""
    res = httpx.post(
        server.url + "/admin/reload",
        timeout=60,
        headers={"authorization": f"Bearer {server.token}"},
    )
    if res.status_code != 200:
        raise RuntimeError(f"reload failed: {res.status_code} {res.text[:300]}")
    version = res.json()["model_version"]
    _logger().info("API serves v%s", version)
    return version


@task(task_run_name="stop API server", cache_policy=NO_CACHE)
def stop_api(server: ApiServer) -> None:
    """Graceful stop (the log writer drains), then a kill if it hangs."""
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)


# --- feedback -------------------------------------------------------------------------------------


@task(task_run_name="simulated clients: round {round_no}", cache_policy=NO_CACHE)
def send_traffic(
    server: ApiServer,
    x: np.ndarray,
    round_no: int,
    clients: int = 4,
    batch: int = 8,
    run_tag: str = "demo",
) -> dict:
    """Clients send the production stream through /predict (client ids, a few in parallel).

    Ids are `{run_tag}-r{round}-{batch start}-{k}`: unique per loop run, so a second
    `mlops run` on the same project logs new predictions instead of retries of old ones.
    """
    chunks = [(f"{run_tag}-r{round_no}-{i}", x[i : i + batch]) for i in range(0, len(x), batch)]
    results: dict[str, int] = {}
    versions: set[str] = set()
    errors: list[str] = []
    lock = threading.Lock()

    def client(part: list) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for prefix, rows in part:
                ids = [f"{prefix}-{k}" for k in range(len(rows))]
                res = http.post("/predict", json={"instances": rows.tolist(), "ids": ids})
                with lock:
                    if res.status_code != 200:
                        errors.append(f"{res.status_code} {res.text[:200]}")
                        continue
                    body = res.json()
                    versions.add(body["model_version"])
                    for p in body["predictions"]:
                        results[p["id"]] = p["label"]

    threads = [threading.Thread(target=client, args=(chunks[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed predictions, first: {errors[0]}")
    _logger().info("%d rows predicted by v%s", len(results), ",".join(sorted(versions)))
    return {"ids": list(results), "versions": sorted(versions)}


@task(task_run_name="post ground truth: round {round_no}", cache_policy=NO_CACHE, **IO_RETRIES)
def send_labels(server: ApiServer, ids: list[str], y: np.ndarray, round_no: int) -> dict:
    """The true labels arrive later, through /feedback, in batches."""
    counts: dict[str, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for start in range(0, len(ids), 256):
            labels = [
                {"id": pid, "label": int(y[_row_of(pid)])} for pid in ids[start : start + 256]
            ]
            res = http.post("/feedback", json={"labels": labels})
            res.raise_for_status()
            for k, v in res.json()["counts"].items():
                counts[k] = counts.get(k, 0) + v
    return counts


def _row_of(pid: str) -> int:
    """The row's position in this round's chunk, from an id made by send_traffic."""
    start, k = pid.rsplit("-", 2)[1:]
    return int(start) + int(k)


@task(task_run_name="pull feedback into data", cache_policy=NO_CACHE, **IO_RETRIES)
def pull_feedback() -> dict:
    from pipeline.feedback import pull_feedback as pull
    from pipeline.preprocess import Preprocessor
    from pipeline.store import PredictionStore

    settings, _ = _context()
    schema = Preprocessor.load(settings.processed_dir / "preprocessor.json").schema
    store = PredictionStore(settings.prediction_db)
    try:
        return pull(store, settings.loop_dir, schema, settings.quarantine_dir).to_dict()
    finally:
        store.dispose()


@task(task_run_name="check input drift", cache_policy=NO_CACHE)
def check_drift(since: float) -> dict:
    """Logged inputs since `since` against the training reference; report to MLflow + /metrics."""
    import json
    import tempfile

    import mlflow
    import pandas as pd

    from pipeline.drift import detect_drift, drift_plot
    from pipeline.preprocess import Preprocessor, features_labels
    from pipeline.registry import CHAMPION, configure_tracking, load_predictor
    from pipeline.store import PredictionStore

    settings, params = _context()
    store = PredictionStore(settings.prediction_db)
    try:
        logged = store.recent(since)
        if len(logged) < 20:
            return {"skipped": f"only {len(logged)} logged rows"}
        pre = Preprocessor.load(settings.processed_dir / "preprocessor.json")
        reference, _ = features_labels(
            pd.read_parquet(settings.processed_dir / "train.parquet"), pre.schema
        )
        current = np.asarray([r["features"] for r in logged], dtype=np.float32)
        cur_probs = np.asarray([r["probabilities"] for r in logged], dtype=np.float32)
        configure_tracking(settings)
        predictor, _ = load_predictor(settings.model_name, CHAMPION)
        cfg = params.get("monitor", {})
        report = detect_drift(
            reference,
            current,
            list(pre.schema.feature_names),
            predictor.predict_proba(reference),
            cur_probs,
            threshold=cfg.get("drift_threshold", 0.2),
        )
        store.add_drift(report.score, json.dumps(report.to_dict()))
        with mlflow.start_run(run_name="drift-check"), tempfile.TemporaryDirectory() as tmp:
            mlflow.log_metrics(
                {
                    "drift_score": report.score,
                    "class_psi": report.class_psi,
                    "confidence_drop": report.confidence_drop,
                }
            )
            mlflow.log_dict(report.to_dict(), "drift/report.json")
            mlflow.log_artifact(
                str(drift_plot(report, reference, current, Path(tmp) / "drift.png")), "drift"
            )
        _logger().info(
            "drift score %.2f (%s), class PSI %.3f, confidence %.3f -> %.3f",
            report.score,
            "DRIFT" if report.drifted else "ok",
            report.class_psi,
            report.confidence_reference,
            report.confidence_current,
        )
        return report.to_dict()
    finally:
        store.dispose()
