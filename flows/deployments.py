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


def register_on_pool(pool: str, params: dict) -> list[str]:
    """Register the loop, retrain and monitor deployments on a process work pool, so any
    worker polling that pool (on this machine or another) runs them from its own checkout."""
    from pathlib import Path

    from prefect import flow

    source = str(Path(__file__).resolve().parents[1])
    cfg = params.get("schedule", {})
    ids = []
    specs = [
        ("flows/loop.py:loop_flow", "loop", {}),
        (
            "flows/retrain.py:retrain_flow",
            RETRAIN_FLOW,
            {"cron": cfg.get("retrain_cron", "0 3 * * *"), "concurrency_limit": 1},
        ),
        (
            "flows/retrain.py:monitor_flow",
            "monitor",
            {"interval": cfg.get("monitor_interval_s", 300)},
        ),
    ]
    for entrypoint, name, extra in specs:
        remote = flow.from_source(source=source, entrypoint=entrypoint)
        ids.append(
            str(
                remote.deploy(
                    name=name,
                    work_pool_name=pool,
                    build=False,
                    push=False,
                    print_next_steps=False,
                    tags=["mlops-loop"],
                    **extra,
                )
            )
        )
    return ids
