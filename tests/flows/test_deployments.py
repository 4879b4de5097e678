"""The deployments `mlops schedule` serves and `mlops worker` registers: their schedules come
from params.yaml (not from fallbacks in the code), and the retraining never overlaps."""

from __future__ import annotations

import pytest

from flows.deployments import build_deployments, register_on_pool
from pipeline.config import Params
from tests.conftest import REPO

# Values no default has: a schedule that ignored params would not show them.
PARAMS = Params().updated(schedule={"retrain_cron": "17 4 * * 2", "monitor_interval_s": 123})


def test_retrain_is_cron_scheduled_and_never_overlaps():
    retrain, monitor = build_deployments(PARAMS)
    assert retrain.name == "retrain" and monitor.name == "monitor"
    assert retrain.schedules[0].schedule.cron == "17 4 * * 2"
    limit = retrain.concurrency_limit
    assert (limit if isinstance(limit, int) else limit.limit) == 1
    assert monitor.schedules[0].schedule.interval.total_seconds() == 123


@pytest.mark.integration
def test_register_on_pool_creates_the_three_deployments(prefect_api):
    """What `mlops worker` does, against a real Prefect API: loop, retrain and monitor on the
    pool, from this checkout's entry points, with params.yaml's schedules."""
    from prefect.client.orchestration import get_client

    pool = "test-pool"
    ids = register_on_pool(pool, PARAMS, source=REPO)
    try:
        _check_registered(ids, pool)
    finally:  # the session's Prefect API is shared: a left-over "retrain" deployment would
        # take the monitor's retraining runs in other tests (nothing polls this pool)
        with get_client(sync_client=True) as client:
            for deployment in set(ids):
                client.delete_deployment(deployment)
            client.delete_work_pool(pool)


def _check_registered(ids: list[str], pool: str) -> None:
    from prefect.client.orchestration import get_client

    assert len(ids) == 3
    with get_client(sync_client=True) as client:
        found = {d.name: d for d in (client.read_deployment(i) for i in ids)}
    assert set(found) == {"loop", "retrain", "monitor"}
    assert {d.work_pool_name for d in found.values()} == {pool}
    assert found["retrain"].entrypoint == "flows/retrain.py:retrain_flow"
    assert found["retrain"].schedules[0].schedule.cron == "17 4 * * 2"
    assert found["monitor"].schedules[0].schedule.interval.total_seconds() == 123
    assert not found["loop"].schedules
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
    assert register_on_pool(pool, PARAMS, source=REPO) == ids  # again: the same, updated
