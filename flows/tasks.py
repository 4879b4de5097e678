"""Prefect tasks: each wraps one pipeline/ step, with retries on I/O and readable run names.

Every task receives the settings and parameters it uses as arguments: none reads
configuration on its own, so a flow's one resolved `Params` (published as the run's `params`
artifact) is what all its tasks ran with.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from pipeline import (
    feedback,
    gate,
    labelqueue,
    lineage,
    monitor,
    process,
    progress,
    registry,
    rollout,
    stream,
)
from pipeline.config import Params, RolloutParams, Settings, load_params
from pipeline.experiment import fit
from pipeline.ingest import read_fixed_test
from pipeline.preprocess import load_preprocessor, preprocess_frames
from pipeline.store import PredictionStore

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}


def _logger():
    """Prefect's run logger inside a run; a plain logger when a task's .fn is called directly."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("flows")


def step(**task_options):
    """A Prefect task that also reports its start and end (under its run name) to
    pipeline.progress, for the live display of `mlops run`."""

    def decorate(fn):
        @functools.wraps(fn)
        def reported(*args, **kwargs):
            context = TaskRunContext.get()
            name = context.task_run.name if context else fn.__name__
            with progress.step(name):
                return fn(*args, **kwargs)

        return task(**task_options)(reported)

    return decorate


# --- data source --------------------------------------------------------------------------------


@step(task_run_name="ingest {source}", cache_policy=NO_CACHE)
def ingest_source(
    settings: Settings, params: Params, source: str, allow_schema_change: bool = False
) -> dict:
    """Source -> data/loop/bootstrap.parquet and the held-out production stream
    (validated; bad rows quarantined)."""
    lineage.ensure_dvc_repo(settings.root)
    report = stream.ingest_with_stream(
        source,
        settings.loop_dir,
        settings.stream_dir,
        settings.quarantine_dir,
        params,
        settings.max_ingest_bytes,
        allow_schema_change,
        settings.downloads_dir,
    )
    _logger().info(
        "%d rows from %s (%d quarantined)", report.rows_ok, source, report.rows_quarantined
    )
    return report.to_dict()


@step(task_run_name="version data (dvc add + push)", cache_policy=NO_CACHE, **IO_RETRIES)
def version_data(settings: Settings) -> str:
    digest = lineage.version_data(settings.root, settings.loop_dir)
    _logger().info("data version %s", digest)
    return digest


# --- data processing ----------------------------------------------------------------------------


@step(task_run_name="preprocess data {data_hash:.10}", cache_policy=NO_CACHE)
def preprocess_data(settings: Settings, params: Params, data_hash: str) -> dict:
    """Split (fixed test split) and fit the preprocessor; cached by data hash."""
    bootstrap, extra = feedback.training_frames(settings.loop_dir)
    fixed = read_fixed_test(settings.loop_dir / feedback.BOOTSTRAP)  # mnist's official test
    return preprocess_frames(bootstrap, settings.processed_dir, params, data_hash, extra, fixed)


# --- training + optimisation --------------------------------------------------------------------


@step(task_run_name="train round {round_no} ({trials} tuning trials)", cache_policy=NO_CACHE)
def train_model(
    settings: Settings,
    params: Params,
    round_no: int,
    trials: int,
    epochs: int | None,
    warm_start: bool,
) -> dict:
    """Optuna search, then the final model: evaluated, logged and registered in MLflow,
    tagged with the source the data version's bootstrap pool came from."""
    source = feedback.read_source(settings.loop_dir)
    if source["source"]:
        params = params.updated(data={"source": source["source"]})
    cand = fit(
        settings,
        params,
        source_hash=source["source_hash"],
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


@step(task_run_name="promote v{version} if better", cache_policy=NO_CACHE, **IO_RETRIES)
def promote(settings: Settings, params: Params, version: str) -> dict:
    d = gate.promote_on_test_split(settings, params, version)
    _logger().info("v%s %s: %s", version, "promoted" if d.promoted else "not promoted", d.reason)
    return {"promoted": d.promoted, "champion_score": d.champion_score, "reason": d.reason}


@step(task_run_name="gate v{version}: before a canary", cache_policy=NO_CACHE, **IO_RETRIES)
def gate_for_canary(settings: Settings, params: Params, version: str) -> dict:
    """The gate on the test split plus the labelled shadow rows; a pass is not applied:
    a canary follows. A refusal is applied (the candidate stays @challenger)."""
    d = gate.promote_on_test_split(settings, params, version, canary=True)
    verdict = "passes, canary next" if d.promoted else "refused"
    _logger().info("v%s %s: %s", version, verdict, d.reason)
    return {
        "passed": d.promoted,
        "reason": d.reason,
        "figures": d.figures,
        "test": d.test,
        "p_value": d.figures.get("p_value"),
        "shadow_rows": int(d.figures.get("shadow_rows", 0)),
    }


# --- safe rollout -----------------------------------------------------------------------------


@step(task_run_name="v{version} in shadow", cache_policy=NO_CACHE, **IO_RETRIES)
def shadow_candidate(settings: Settings, api: ApiServer, version: str) -> str | None:
    """Name the candidate @challenger, which the loop's server scores in shadow; returns the
    version the server's shadow now runs (None: the server has no shadow configured)."""
    registry.set_alias(settings.model_name, registry.CHALLENGER, version)
    res = httpx.post(
        api.url + "/admin/reload", timeout=60, headers={"authorization": f"Bearer {api.token}"}
    )
    res.raise_for_status()
    shadow = res.json().get("shadow") or {}
    _logger().info("shadow: %s", shadow or "not configured on this server")
    return shadow.get("model_version")


@step(task_run_name="shadow figures", cache_policy=NO_CACHE, **IO_RETRIES)
def shadow_figures(settings: Settings, since: float) -> dict | None:
    """Agreement with the champion, and both versions' accuracy on the same labelled rows."""
    store = PredictionStore(settings.prediction_db)
    try:
        found = store.create().shadow_summary(settings.model_name, since)
    finally:
        store.dispose()
    return found[0] if found else None


def loop_guards(params: Params, expected_rows: int, all_labelled: bool = True) -> RolloutParams:
    """The demo's canary sees one round's share of traffic in a few seconds, so its sample
    sizes and window are scaled to that (params' rollout section caps them). When the loop
    labels every row it promotes only once accuracy was judged: on a slow machine the
    window could end before the labels came, and an unjudged candidate, the faulty one
    included, was promoted. Under a label budget, too few labels may come to judge it."""
    g = params.rollout
    enough = max(5, expected_rows // 3)
    return g.model_copy(
        update={
            "window_s": min(g.window_s, 4.0),
            "check_interval_s": min(g.check_interval_s, 0.5),
            "min_samples": min(g.min_samples, enough),
            "min_labels": min(g.min_labels, enough),
            "require_labels": all_labelled,
        }
    )


@step(task_run_name="canary v{version} at {fraction}", cache_policy=NO_CACHE, **IO_RETRIES)
def start_canary(
    settings: Settings,
    api: ApiServer,
    guards: RolloutParams,
    version: str,
    fraction: float,
    gate: dict,
    timeout_s: float = 60.0,
) -> dict:
    """Start the rollout, then wait until the server has the candidate loaded and routes
    to it (it polls the store), so the traffic that follows meets the canary."""
    lead = "gate: " if gate["passed"] else "sent despite the gate (--faulty-candidate): "
    why = (lead + gate["reason"])[:400]
    started = rollout.start(settings, version, guards, fraction, why=why, figures=gate["figures"])
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=api.url, timeout=10) as http:
        while time.monotonic() < deadline:
            canary = http.get("/model").json().get("canary") or {}
            if canary.get("candidate") == version and canary.get("candidate_loaded"):
                return started
            time.sleep(0.1)
    rollout.finish(settings, "abort", "the API server did not take up the canary")
    raise RuntimeError(f"the API server did not take up the canary of v{version} in {timeout_s} s")


@step(task_run_name="canary decision", cache_policy=NO_CACHE)
def await_canary(settings: Settings, guards: RolloutParams, timeout_s: float = 30.0) -> dict:
    """Wait for the servers' guard rails to decide; past the window plus `timeout_s`, decide
    here on the same figures (a canary that saw too few rows is rolled back: no evidence)."""
    deadline = time.monotonic() + guards.window_s + timeout_s
    while time.monotonic() < deadline:
        info = rollout.status(settings)
        if info is None or info["state"] != "running":
            break
        rollout.step(settings)
        time.sleep(guards.check_interval_s)
    info = rollout.status(settings) or {}
    if info.get("state") == "running":
        info = rollout.finish(settings, "abort", "too few rows to decide within the window")
        info = rollout.status(settings) or info
    outcome = {"promoted": "promoted", "aborted": "rolled back"}.get(info.get("state"), "-")
    _logger().info("canary v%s %s: %s", info.get("candidate"), outcome, info.get("reason"))
    return {"outcome": outcome, "reason": info.get("reason"), "candidate": info.get("candidate")}


# --- deployment ---------------------------------------------------------------------------------


@dataclass
class ApiServer:
    server: process.Supervised | None  # None: a running server this flow did not start
    url: str
    token: str


@step(task_run_name="start API server", cache_policy=NO_CACHE)
def start_api(settings: Settings) -> ApiServer:
    """A real `mlops serve` process on a free loopback port, following the champion; or the
    running server named by MLOPS_API_URL (production topology)."""
    if settings.api_url:
        if settings.admin_token is None:
            raise RuntimeError("MLOPS_API_URL is set: MLOPS_ADMIN_TOKEN must be too")
        _logger().info("using the running API server at %s", settings.api_url)
        return ApiServer(
            None, settings.api_url.rstrip("/"), settings.admin_token.get_secret_value()
        )
    port, token = process.free_port(), secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "MLOPS_ROOT": str(settings.root),
        "MLOPS_ADMIN_TOKEN": token,
        "MLOPS_RELOAD_INTERVAL_S": os.environ.get("MLOPS_RELOAD_INTERVAL_S", "5"),
        # the round's candidate is scored in shadow (the loop names it @challenger), and a
        # canary is picked up within half a second
        "MLOPS_SHADOW_MODEL": os.environ.get("MLOPS_SHADOW_MODEL", "challenger"),
        "MLOPS_ROLLOUT_POLL_S": os.environ.get("MLOPS_ROLLOUT_POLL_S", "0.5"),
    }
    mlops = str(Path(sys.executable).parent / "mlops")
    server = process.start(
        [mlops, "serve", "--port", str(port)],
        f"http://127.0.0.1:{port}",
        settings.data_dir / "api-server.log",
        env=env,
        cwd=settings.root,
    ).wait_healthy("/health")
    _logger().info("API server on %s (pid %d)", server.url, server.pid)
    return ApiServer(server, server.url, token)


@step(task_run_name="deploy champion to the API", cache_policy=NO_CACHE, **IO_RETRIES)
def deploy(api: ApiServer) -> str:
    """Hot-swap the running server to the current champion; returns the version it serves."""
    res = httpx.post(
        api.url + "/admin/reload",
        timeout=60,
        headers={"authorization": f"Bearer {api.token}"},
    )
    if res.status_code != 200:
        raise RuntimeError(f"reload failed: {res.status_code} {res.text[:300]}")
    version = res.json()["model_version"]
    _logger().info("API serves v%s", version)
    return version


@step(task_run_name="stop API server", cache_policy=NO_CACHE)
def stop_api(api: ApiServer) -> None:
    """Graceful stop (the log writer drains), then a kill if it hangs."""
    if api.server is not None:
        api.server.stop()


# --- feedback -------------------------------------------------------------------------------------


@step(task_run_name="plan the production stream", cache_policy=NO_CACHE)
def plan_stream(settings: Settings, params: Params, rounds: int) -> list[stream.Chunk | None]:
    """Which rows of the held-out stream each round sends, after what earlier runs sent."""
    return stream.plan(settings.stream_dir, rounds, params.data.stream_per_round)


@step(task_run_name="simulated clients: round {round_no}{part}", cache_policy=NO_CACHE)
def send_traffic(
    settings: Settings,
    api: ApiServer,
    chunk: stream.Chunk,
    round_no: int,
    drift: bool = False,
    part: str = "",
    clients: int = 4,
    batch: int = 8,
) -> dict:
    """Clients send this round's rows of the stream through /predict, a few in parallel,
    each row under an id made from its place in the stream (a resend is logged once).
    Each request stands for one end user, named by `X-Client-Id` (a canary's sticky split)."""
    schema = load_preprocessor(settings.processed_dir).schema
    x, _ = stream.rows(settings.stream_dir, chunk, schema, drift)
    ids = chunk.ids()
    parts = [(ids[i : i + batch], x[i : i + batch]) for i in range(0, len(x), batch)]
    results: dict[str, int] = {}
    versions: set[str] = set()
    served: dict[str, int] = {}  # rows answered, by version
    errors: list[str] = []
    lock = threading.Lock()

    def client(mine: list) -> None:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for part_ids, rows in mine:
                res = http.post(
                    "/predict",
                    json={"instances": rows.tolist(), "ids": part_ids},
                    headers={"x-client-id": f"user-{part_ids[0]}"},
                )
                with lock:
                    if res.status_code != 200:
                        errors.append(f"{res.status_code} {res.text[:200]}")
                        continue
                    body = res.json()
                    versions.add(body["model_version"])
                    served[body["model_version"]] = served.get(body["model_version"], 0) + len(
                        part_ids
                    )
                    for p in body["predictions"]:
                        results[p["id"]] = p["label"]

    threads = [threading.Thread(target=client, args=(parts[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed predictions, first: {errors[0]}")
    _logger().info("%d rows predicted by v%s", len(results), ",".join(sorted(versions)))
    return {"ids": [i for i in ids if i in results], "versions": sorted(versions), "served": served}


@step(
    task_run_name="post ground truth: round {round_no}{part}", cache_policy=NO_CACHE, **IO_RETRIES
)
def send_labels(
    settings: Settings,
    api: ApiServer,
    chunk: stream.Chunk,
    ids: list[str],
    round_no: int,
    part: str = "",
    budget: int | None = None,
    strategy: str = "uncertainty",
) -> dict:
    """The true labels arrive later, through /feedback, in batches; then the stream's cursor
    moves past the chunk. With a `budget`, only that many rows get their label: the ones
    the label queue's `strategy` (pipeline/labelqueue.py) ranks first."""
    schema = load_preprocessor(settings.processed_dir).schema
    _, y = stream.rows(settings.stream_dir, chunk, schema)
    label_of = dict(zip(chunk.ids(), (int(v) for v in y), strict=True))
    if budget is not None:
        store = PredictionStore(settings.prediction_db)
        try:
            logged = store.get(ids)
        finally:
            store.dispose()
        rows = [{"id": i, **logged[i]} for i in ids if i in logged]
        ids = [r["id"] for r in labelqueue.rank(rows, strategy, budget, seed=round_no)]
        _logger().info("labelling %d of %d rows, by %s", len(ids), len(rows), strategy)
    counts: dict[str, int] = {}
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for start in range(0, len(ids), 256):
            labels = [{"id": pid, "label": label_of[pid]} for pid in ids[start : start + 256]]
            res = http.post("/feedback", json={"labels": labels})
            res.raise_for_status()
            for k, v in res.json()["counts"].items():
                counts[k] = counts.get(k, 0) + v
    stream.advance(settings.stream_dir, chunk)
    return counts


@step(task_run_name="pull feedback into data", cache_policy=NO_CACHE, **IO_RETRIES)
def pull_feedback(settings: Settings) -> dict:
    schema = load_preprocessor(settings.processed_dir).schema
    chunk_rows = load_params(settings.params_path).data.chunk_rows
    store = PredictionStore(settings.prediction_db)
    try:
        report = feedback.pull_feedback(
            store, settings.loop_dir, schema, settings.quarantine_dir, chunk_rows=chunk_rows
        )
    finally:
        store.dispose()
    return report.to_dict()


@step(task_run_name="check input drift", cache_policy=NO_CACHE)
def check_drift(settings: Settings, params: Params, since: float) -> dict:
    """Logged inputs since `since` against the training reference; report to MLflow + /metrics."""
    return monitor.check_drift(settings, params, since)


@step(task_run_name="live performance", cache_policy=NO_CACHE, **IO_RETRIES)
def performance_figures(settings: Settings, params: Params, horizon_s: float) -> dict:
    """Coverage, label latency, realized and estimated accuracy per version and window over
    the last `horizon_s`, kept for /metrics; the champion's latest figures for the trigger."""
    found = monitor.performance(settings, params, time.time() - horizon_s)
    monitor.record_performance(settings, found)
    champion = registry.alias_version(settings.model_name, registry.CHAMPION)
    mine = [w for w in found if w.version == champion]
    mature = [w for w in mine if w.realized is not None]
    return {
        "champion": champion,
        "realized": mature[-1].realized if mature else None,
        "estimated": mine[-1].estimated if mine else None,
        "windows": [w.to_dict() for w in found],
    }


@step(task_run_name="count new labels", cache_policy=NO_CACHE, **IO_RETRIES)
def count_new_labels(settings: Settings) -> int:
    return monitor.new_labels(settings)
