"""Deployments served by `mlops schedule`: retraining on a cron schedule, the monitor on an
interval. The retraining deployment has a concurrency limit of 1: never two at once."""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import flow

from flows.retrain import RETRAIN_FLOW, monitor_flow, retrain_flow
from pipeline.config import Params

PROJECT = Path(__file__).resolve().parents[1]


def build_deployments(params: Params) -> list:
    """The retrain (cron) and monitor (interval) deployments, on params.yaml's schedule."""
    retrain = retrain_flow.to_deployment(
        name=RETRAIN_FLOW,
        cron=params.schedule.retrain_cron,
        concurrency_limit=1,
        description="Pull feedback, version it, retrain, promote if better.",
        tags=["mlops-loop"],
    )
    monitor = monitor_flow.to_deployment(
        name="monitor",
        interval=params.schedule.monitor_interval_s,
        description="Retrain when enough labels arrived or the inputs drifted.",
        tags=["mlops-loop"],
    )
    return [retrain, monitor]


def ensure_process_pool(pool: str) -> None:
    """Create the process work pool `pool` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def pool_specs(params: Params) -> list[tuple[str, str, dict]]:
    """(entrypoint, deployment name, schedule options) of what `mlops worker` registers."""
    return [
        ("flows/loop.py:loop_flow", "loop", {}),
        (
            "flows/retrain.py:retrain_flow",
            RETRAIN_FLOW,
            {"cron": params.schedule.retrain_cron, "concurrency_limit": 1},
        ),
        (
            "flows/retrain.py:monitor_flow",
            "monitor",
            {"interval": params.schedule.monitor_interval_s},
        ),
    ]


def register_on_pool(pool: str, params: Params, source: Path = PROJECT) -> list[str]:
    """Register the loop, retrain and monitor deployments on a process work pool, so any
    worker polling that pool (on this machine or another) runs them from its own checkout
    (`source`: where the flows' code lives, this checkout by default). The pool is created
    when missing."""
    ensure_process_pool(pool)
    ids = []
    specs = pool_specs(params)
    for entrypoint, name, extra in specs:
        remote = flow.from_source(source=str(source), entrypoint=entrypoint)
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
