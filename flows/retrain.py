"""Retraining and monitoring flows: the loop's feedback side, run by schedules and triggers."""

from __future__ import annotations

import time
from dataclasses import asdict

from prefect import flow, get_run_logger

from flows.report import publish_params, publish_performance, publish_summary
from flows.tasks import (
    check_drift,
    count_new_labels,
    performance_figures,
    preprocess_data,
    promote,
    pull_feedback,
    train_model,
    version_data,
)
from pipeline.config import Params, get_settings, load_params
from pipeline.drift import TriggerInputs, should_retrain

RETRAIN_FLOW = "retrain"


@flow(name=RETRAIN_FLOW, flow_run_name="retrain: {reason}")
def retrain_flow(
    reason: str = "schedule",
    trials: int | None = None,
    epochs: int | None = None,
    params: Params | None = None,
) -> dict:
    """feedback -> new data version -> preprocess -> tune + train -> promote if better.

    Running servers follow the champion alias, so a promotion reaches them by itself.
    """
    settings = get_settings()
    params = params or load_params(settings.params_path)
    publish_params(params)
    trials = params.tune.trials if trials is None else trials
    pulled = pull_feedback(settings)
    data_hash = version_data(settings)
    split = preprocess_data(settings, params, data_hash)
    model = train_model(settings, params, 0, trials, epochs, params.train.warm_start)
    decision = promote(settings, params, model["version"])
    summary = {
        "reason": reason,
        "pulled": pulled["new"],
        "data_version": data_hash,
        "train_rows": split["rows"]["train"],
        "model_version": model["version"],
        "test_accuracy": model["accuracy"],
        "promoted": decision["promoted"],
    }
    publish_summary("retrain", "last retraining run", summary)
    return summary


@flow(name="monitor", flow_run_name="monitor")
def monitor_flow(params: Params | None = None) -> dict:
    """Start a retraining run when enough new labels arrived or inputs drifted, with a
    cooldown, and never while another retraining run is in progress."""
    settings = get_settings()
    params = params or load_params(settings.params_path)
    publish_params(params)
    cfg = params.monitor
    new_labels = count_new_labels(settings)
    drift = check_drift(settings, params, time.time() - cfg.window_s)
    perf = performance_figures(settings, params, horizon_s=24 * cfg.perf_window_s)
    last, running = _retrain_history()
    inputs = TriggerInputs(
        new_labels=new_labels,
        drift_score=drift.get("score"),
        drift_alarm=bool(drift.get("alarm")),
        realized=perf["realized"],
        estimated=perf["estimated"],
        champion_test_accuracy=_champion_test_accuracy(settings),
        last_retrain_at=last,
        now=time.time(),
        retrain_running=running,
    )
    go, reasons = should_retrain(inputs, cfg)
    why = "; ".join(reasons)
    get_run_logger().info("retrain: %s (%s)", "yes" if go else "no", why)
    # every decision, and every non-decision, with its reasons where the Prefect UI shows it
    publish_summary(
        "monitor-decision",
        "the monitor's last decision",
        {"retrain": "yes" if go else "no", **{f"reason {k + 1}": r for k, r in enumerate(reasons)},
         **{k: v for k, v in asdict(inputs).items() if k != "now"}},
    )  # fmt: skip
    publish_performance(perf["windows"])
    if go:
        _start_retrain(why, params)
    return {
        "retrain": go,
        "reason": why,
        "new_labels": new_labels,
        "drift": drift.get("score"),
        "drift_alarm": inputs.drift_alarm,
        "realized": inputs.realized,
        "estimated": inputs.estimated,
    }


def _champion_test_accuracy(settings) -> float | None:
    from pipeline.registry import status

    champion = status(settings).get("champion")
    return champion["test_accuracy"] if champion else None


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


def _start_retrain(reason: str, params: Params) -> None:
    """Through the deployment when one is served (its concurrency limit is 1), else inline."""
    from prefect.deployments import run_deployment

    try:
        run_deployment(f"{RETRAIN_FLOW}/{RETRAIN_FLOW}", parameters={"reason": reason}, timeout=0)
    except Exception as exc:  # noqa: BLE001 - no deployment: run it here as a subflow
        get_run_logger().info("no retrain deployment (%s): running it inline", exc)
        retrain_flow(reason=reason, params=params)
