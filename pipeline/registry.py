"""The MLflow model registry: versions and aliases.

`@champion` is what serves, `@challenger` the last version that lost (or was replaced).
Every alias change is recorded in the ledger (pipeline/ledger.py); the decision whether a
new version should become champion is the gate's (pipeline/gate.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from pipeline import ledger
from pipeline.config import Settings
from pipeline.model import Predictor
from pipeline.redact import redact
from pipeline.tracking import RegistryUnavailable, is_unreachable, with_retries

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """A registry request that cannot succeed (unknown version, nothing to roll back to)."""


def register(
    model_uri: str, name: str, tags: dict[str, str], description: str | None = None
) -> str:
    """Register a logged model as a new version of `name` (with a description the MLflow UI
    shows on the version's page); returns the version string."""

    def call():
        # MLflow prints "Successfully registered model ..." / "Created version ..." to stderr
        # itself; one log line of ours says it instead, at the level the user chose.
        with contextlib.redirect_stderr(io.StringIO()):
            return mlflow.register_model(model_uri, name, tags=tags)

    mv = with_retries("registering the model", call)
    log.info("registered %s v%s", name, mv.version)
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


@contextmanager
def champion_lock(settings: Settings):
    """Serialise every change of the champion (promote, the gate, rollback) across all
    processes that share the prediction store's database, the one database every server,
    flow and CLI of a deployment already reaches. Inside, the ledger is read fresh, so a
    change is decided on the champion as it is, not as it was a moment ago."""
    from pipeline.store import LockTimeout, PredictionStore

    store = PredictionStore(settings.prediction_db).create()
    try:
        with store.lock(f"champion:{settings.model_name}"):
            yield
    except LockTimeout as exc:
        raise RegistryError(f"another promotion or rollback is running: {exc}") from exc
    finally:
        store.dispose()


def current_champion(settings: Settings) -> str | None:
    """The champion, by the ledger when the alias disagrees with it (the alias is repaired):
    the ledger is the record of what was decided; an alias is a pointer that a crash
    between two calls, or a hand edit in the UI, can leave behind."""
    name = settings.model_name
    alias = alias_version(name, CHAMPION)
    stack = ledger.champion_history(settings)
    if not stack or stack[-1] == alias:
        return alias
    log.warning("@%s is v%s but the ledger says v%s: restoring it", CHAMPION, alias, stack[-1])
    set_alias(name, CHAMPION, stack[-1])
    return stack[-1]


def check_loads(name: str, version: str) -> None:
    """A version becomes champion only if it loads and predicts (a row of zeros)."""
    try:
        predictor, _ = load_predictor(name, version)
        predictor.predict_proba(np.zeros((1, len(predictor.feature_names)), dtype=np.float32))
    except RegistryUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever is broken in it, it is not promoted
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RegistryError(f"v{version} cannot be loaded, so it is not promoted: {first}") from exc


def set_champion(
    settings: Settings,
    version: str,
    reason: str = "manual promotion",
    metrics: dict | None = None,
) -> None:
    """`mlops promote VERSION`: make an existing version the champion."""
    name, version = settings.model_name, str(version)
    resolve(name, version)
    check_loads(name, version)
    with champion_lock(settings):
        current = current_champion(settings)
        if current == version:
            raise RegistryError(f"v{version} is already the champion")
        set_alias(name, CHAMPION, version)
        if current:
            set_alias(name, CHALLENGER, current)
        ledger.record(
            settings, "promote", current, version, reason, metrics or {}, candidate=version
        )


def rollback(settings: Settings, reason: str = "manual rollback") -> tuple[str, str]:
    """Make the champion before the current one the champion again; returns (from, to)."""
    name = settings.model_name
    with champion_lock(settings):
        current = current_champion(settings)
        stack = ledger.champion_history(settings)
        if len(stack) < 2 or current is None:
            raise RegistryError("no previous champion to roll back to")
        target = stack[-2]
        check_loads(name, target)
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
