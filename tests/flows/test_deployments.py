"""The deployments `mlops schedule` serves: schedules and the no-overlap limit."""

from __future__ import annotations

from flows.deployments import build_deployments
from pipeline.config import load_params
from tests.conftest import REPO


def test_retrain_is_cron_scheduled_and_never_overlaps():
    params = load_params(REPO / "params.yaml")
    retrain, monitor = build_deployments(params)
    assert retrain.name == "retrain" and monitor.name == "monitor"
    assert retrain.schedules[0].schedule.cron == params["schedule"]["retrain_cron"]
    limit = retrain.concurrency_limit
    assert (limit if isinstance(limit, int) else limit.limit) == 1
    interval = monitor.schedules[0].schedule.interval
    assert interval.total_seconds() == params["schedule"]["monitor_interval_s"]
