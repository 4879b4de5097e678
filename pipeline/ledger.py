"""The promotion ledger: every promotion, rejection and rollback, append-only.

Each entry is a run in the `<model>-promotions` MLflow experiment, so the MLflow UI shows
the history and it works against a remote tracking server with nothing else to run.
Replaying it gives the order in which versions were champion (what a rollback pops).
"""

from __future__ import annotations

import getpass
import time

import mlflow

from pipeline.config import Settings
from pipeline.tracking import LEDGER_COLUMNS, experiment_id, log_metrics, with_retries


def ledger_name(settings: Settings) -> str:
    return f"{settings.model_name}-promotions"


def record(
    settings: Settings,
    action: str,
    from_version: str | None,
    to_version: str | None,
    reason: str,
    metrics: dict,
    candidate: str | None = None,
    test: str | None = None,
) -> None:
    """Append one entry: `action` is promote, reject, rollback or a rollout step
    (rollout-start, rollout-promote, rollout-abort); `test` names the gate's rule."""
    client = mlflow.MlflowClient()
    exp = with_retries(
        "opening the ledger",
        lambda: experiment_id(settings, ledger_name(settings), LEDGER_COLUMNS),
    )
    tags = {
        "ledger.action": action,
        "ledger.from_version": from_version or "",
        "ledger.to_version": to_version or "",
        "ledger.candidate": candidate or "",
        "ledger.reason": reason,
        "ledger.seq": str(time.time_ns()),
        "ledger.actor": _actor(),
        "ledger.test": test or "",
        "mlflow.note.content": reason,  # the run's description in the UI
    }
    name = f"{action} v{candidate or to_version}: v{from_version or '-'} -> v{to_version or '-'}"
    run = client.create_run(exp, run_name=name, tags=tags)
    # visible columns of the ledger's run list: what was decided, from what, to what, why
    decision = {
        "action": action,
        "from": from_version or "-",
        "to": to_version or "-",
        "reason": reason[:500],
    }
    for key, value in decision.items():
        client.log_param(run.info.run_id, key, value)
    log_metrics(run.info.run_id, metrics)
    client.set_terminated(run.info.run_id)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def entries(settings: Settings, limit: int = 1000) -> list[dict]:
    """Ledger entries, newest first."""
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(ledger_name(settings))
    if exp is None:
        return []
    runs = with_retries(
        "reading the ledger",
        lambda: client.search_runs(
            [exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
        ),
    )
    found = [
        {
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000)),
            "action": r.data.tags.get("ledger.action"),
            "from": r.data.tags.get("ledger.from_version") or None,
            "to": r.data.tags.get("ledger.to_version") or None,
            "candidate": r.data.tags.get("ledger.candidate") or None,
            "reason": r.data.tags.get("ledger.reason"),
            "test": r.data.tags.get("ledger.test") or None,
            "seq": int(r.data.tags.get("ledger.seq", "0")),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]
    return sorted(found, key=lambda e: e["seq"], reverse=True)


def champion_history(settings: Settings) -> list[str]:
    """Champions in order, replaying the ledger: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for entry in reversed(entries(settings)):
        if entry["action"] == "promote" and entry["to"]:
            stack.append(entry["to"])
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    return stack
