"""Deployments served by `mlops schedule`: retraining on a cron schedule, the monitor on an
interval. The retraining deployment has a concurrency limit of 1: never two at once."""

from __future__ import annotations

from flows.retrain import RETRAIN_FLOW, monitor_flow, retrain_flow


def build_deployments(params: dict) -> list:
    cfg = params.get("schedule", {})
    retrain = retrain_flow.to_deployment(
        name=RETRAIN_FLOW,
        cron=cfg.get("retrain_cron", "0 3 * * *"),
        concurrency_limit=1,
        description="Pull feedback, version it, retrain, promote if better.",
        tags=["mlops-loop"],
    )
    monitor = monitor_flow.to_deployment(
        name="monitor",
        interval=cfg.get("monitor_interval_s", 300),
        description="Retrain when enough labels arrived or the inputs drifted.",
        tags=["mlops-loop"],
    )
    return [retrain, monitor]
