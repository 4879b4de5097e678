"""Retraining and monitoring flows: the loop's feedback side, run by schedules and triggers."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.tasks import (
    _context,
    check_drift,
    preprocess_data,
    promote,
    pull_feedback,
    train_model,
    version_data,
)

RETRAIN_FLOW = "retrain"


@flow(name=RETRAIN_FLOW, flow_run_name="retrain: {reason}")
def retrain_flow(
    reason: str = "schedule", trials: int | None = None, epochs: int | None = None
) -> dict:
    """feedback -> new data version -> preprocess -> tune + train -> promote if better.

    Running servers follow the champion alias, so a promotion reaches them by itself.
    """
    _, params = _context()
    trials = params.get("tune", {}).get("trials", 0) if trials is None else trials
    pulled = pull_feedback()
    data_hash = version_data()
    split = preprocess_data(data_hash)
    model = train_model(0, trials, epochs, params["train"].get("warm_start", False))
    decision = promote(model["version"])
    summary = {
        "reason": reason,
        "pulled": pulled["new"],
        "data_version": data_hash,
        "train_rows": split["rows"]["train"],
        "model_version": model["version"],
        "test_accuracy": model["accuracy"],
        "promoted": decision["promoted"],
    }
    create_markdown_artifact(
        "\n".join(
            ["| field | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in summary.items()]
        ),
        key="retrain",
        description="last retraining run",
    )
    return summary


@flow(name="monitor", flow_run_name="monitor")
def monitor_flow(window_s: float = 3600) -> dict:
    """Start a retraining run when enough new labels arrived or inputs drifted, with a
    cooldown, and never while another retraining run is in progress."""
    from pipeline.drift import TriggerConfig, should_retrain
    from pipeline.feedback import read_state
    from pipeline.store import PredictionStore

    settings, params = _context()
    cfg = TriggerConfig(
        **{
            k: v
            for k, v in params.get("monitor", {}).items()
            if k in TriggerConfig.__dataclass_fields__
        }
    )
    store = PredictionStore(settings.prediction_db)
    try:
        watermark = read_state(settings.loop_dir)["watermark"]
        new_labels = len(store.labelled_since(watermark))
    finally:
        store.dispose()
    drift = check_drift(time.time() - window_s).get("score")
    last, running = _retrain_history()
    go, why = should_retrain(new_labels, drift, last, time.time(), running, cfg)
    get_run_logger().info("retrain: %s (%s)", "yes" if go else "no", why)
    if go:
        _start_retrain(why)
    return {"retrain": go, "reason": why, "new_labels": new_labels, "drift": drift}


def _retrain_history() -> tuple[float | None, bool]:
    """(start time of the last retraining run, whether one is running) from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[RETRAIN_FLOW])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=20,
        )
    running = any(
        r.state and r.state.type.value in {"RUNNING", "PENDING", "SCHEDULED"} for r in runs
    )
    started = [r.start_time.timestamp() for r in runs if r.start_time]
    return (max(started) if started else None), running


def _start_retrain(reason: str) -> None:
    """Through the deployment when one is served (its concurrency limit is 1), else inline."""
    from prefect.deployments import run_deployment

    try:
        run_deployment(f"{RETRAIN_FLOW}/{RETRAIN_FLOW}", parameters={"reason": reason}, timeout=0)
    except Exception as exc:  # noqa: BLE001 - no deployment: run it here as a subflow
        get_run_logger().info("no retrain deployment (%s): running it inline", exc)
        retrain_flow(reason=reason)
