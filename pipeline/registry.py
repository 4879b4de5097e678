"""The MLflow model registry: versions and aliases.

`@champion` is what serves, `@challenger` the last version that lost (or was replaced).
Every alias change is recorded in the ledger (pipeline/ledger.py); the decision whether a
new version should become champion is the gate's (pipeline/gate.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline import ledger
from pipeline.config import Settings
from pipeline.model import Predictor
from pipeline.redact import redact
from pipeline.tracking import is_unreachable, with_retries

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """A registry request that cannot succeed (unknown version, nothing to roll back to)."""


def register(
    model_uri: str, name: str, tags: dict[str, str], description: str | None = None
) -> str:
    """Register a logged model as a new version of `name` (with a description the MLflow UI
    shows on the version's page); returns the version string."""
    mv = with_retries(
        "registering the model", lambda: mlflow.register_model(model_uri, name, tags=tags)
    )
    if description:
        with_retries(
            "describing the model version",
            lambda: mlflow.MlflowClient().update_model_version(
                name, str(mv.version), description=description
            ),
        )
    return str(mv.version)


def resolve(name: str, ref: str):
    """The ModelVersion that `ref` (a number or an alias) names; RegistryError if none."""
    client = mlflow.MlflowClient()

    def get():
        try:
            if str(ref).isdigit():
                return client.get_model_version(name, str(ref))
            return client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            if is_unreachable(exc):
                raise
            raise RegistryError(f"{name}: no version {ref!r} in the registry") from exc

    return with_retries(f"resolving {name}:{ref}", get)


def download_model(name: str, ref: str, dst: Path | None = None) -> tuple[Path, object]:
    """Fetch version `ref` (a number or an alias) of `name`; returns (model dir, ModelVersion)."""
    mv = resolve(name, ref)
    dst = dst or Path(tempfile.mkdtemp(prefix=f"{name}-v{mv.version}-"))
    local = with_retries(
        f"downloading {name} v{mv.version}",
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst)
        ),
    )
    return Path(local) / "artifacts" / "model_dir", mv


def load_predictor(name: str, ref: str, device: str = "cpu") -> tuple[Predictor, object]:
    model_dir, mv = download_model(name, ref)
    return Predictor.from_dir(model_dir, device), mv


def alias_version(name: str, alias: str) -> str | None:
    """The version `@alias` points at, or None."""
    client = mlflow.MlflowClient()

    def get() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if is_unreachable(exc):
                raise
            return None

    return with_retries(f"reading @{alias}", get)


def set_alias(name: str, alias: str, version: str) -> None:
    client = mlflow.MlflowClient()
    with_retries(
        f"setting @{alias}", lambda: client.set_registered_model_alias(name, alias, version)
    )


def set_champion(settings: Settings, version: str, reason: str = "manual promotion") -> None:
    """`mlops promote VERSION`: make an existing version the champion."""
    name = settings.model_name
    resolve(name, version)
    current = alias_version(name, CHAMPION)
    if current == str(version):
        raise RegistryError(f"v{version} is already the champion")
    set_alias(name, CHAMPION, str(version))
    if current:
        set_alias(name, CHALLENGER, current)
    ledger.record(settings, "promote", current, str(version), reason, {}, candidate=str(version))


def rollback(settings: Settings, reason: str = "manual rollback") -> tuple[str, str]:
    """Make the champion before the current one the champion again; returns (from, to)."""
    name = settings.model_name
    stack = ledger.champion_history(settings)
    current = alias_version(name, CHAMPION)
    if len(stack) < 2 or current is None:
        raise RegistryError("no previous champion to roll back to")
    target = stack[-2]
    set_alias(name, CHAMPION, target)
    set_alias(name, CHALLENGER, current)
    ledger.record(settings, "rollback", current, target, reason, {})
    return current, target


def status(settings: Settings) -> dict:
    """Champion and challenger with their data versions and test accuracy, plus the ledger."""
    client, name = mlflow.MlflowClient(), settings.model_name
    out: dict = {"model": name, "tracking_uri": redact(mlflow.get_tracking_uri())}
    for alias in (CHAMPION, CHALLENGER):
        version = alias_version(name, alias)
        if version is None:
            out[alias] = None
            continue
        mv = client.get_model_version(name, version)
        run = client.get_run(mv.run_id) if mv.run_id else None
        out[alias] = {
            "version": version,
            "run_id": mv.run_id,
            "data_hash": mv.tags.get("data_hash"),
            "git_commit": mv.tags.get("git_commit"),
            "test_accuracy": run.data.metrics.get("test_accuracy") if run else None,
        }
    out["ledger"] = ledger.entries(settings, limit=10)
    return out
