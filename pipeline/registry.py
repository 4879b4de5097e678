"""MLflow tracking and model registry: runs, logged models, aliases, the promotion gate.

Conventions:
- experiment = the registered model name; the pyfunc is logged at artifact path `model`;
- `@champion` is what serves, `@challenger` the last version that lost (or was replaced);
- every promotion, rejection and rollback is a run in the `<name>-promotions` experiment:
  an append-only ledger that the MLflow UI shows and that works against a remote server.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.model import Predictor

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
T = TypeVar("T")


class RegistryUnavailable(RuntimeError):
    """The tracking server / registry could not be reached; nothing was changed."""


class RegistryError(RuntimeError):
    """A registry request that cannot succeed (unknown version, nothing to roll back to)."""


def configure_tracking(settings) -> str:
    """Point MLflow at the configured store; return the experiment id for the model."""
    import mlflow

    # Bounded retries: a registry that is down fails in seconds, not after MLflow's default minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = with_retries(
        f"opening experiment {settings.model_name!r}",
        lambda: _experiment_id(settings, settings.model_name),
    )
    mlflow.set_experiment(experiment_id=experiment)  # nested runs land beside their parent
    return experiment


def _experiment_id(settings, name: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = not settings.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = f"{settings.artifact_location}/{name}" if local else None
    return mlflow.create_experiment(name, artifact_location=location)


def with_retries(action: str, fn: Callable[[], T], attempts: int = 3, delay: float = 0.5) -> T:
    """Call `fn`; on a connection failure retry with backoff, then raise RegistryUnavailable."""
    import mlflow

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _is_unreachable(exc):
                raise
            if attempt == attempts:
                raise RegistryUnavailable(
                    f"MLflow at {mlflow.get_tracking_uri()} is unreachable ({action}; "
                    f"{attempts} attempts): {_first_line(exc)}"
                ) from exc
            log.warning("registry unreachable (%s), retry %d/%d", action, attempt, attempts - 1)
            time.sleep(delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _is_unreachable(exc: BaseException) -> bool:
    import requests
    import sqlalchemy.exc

    if isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | sqlalchemy.exc.OperationalError
        | ConnectionError,
    ):
        return True
    text = str(exc)
    return any(
        s in text
        for s in (
            "Max retries exceeded",
            "Connection refused",
            "Failed to establish",
            "timed out",
            "API request to",
        )
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# --- runs ----------------------------------------------------------------------------------------


class EpochLogger:
    """Logs one batch of metrics per epoch (never one call per step)."""

    def __init__(self, run_id: str, prefix: str = "") -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.prefix = MlflowClient(), run_id, prefix

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.prefix + k, float(v), now, epoch) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)


def log_evaluation(
    run_id: str,
    metrics: dict,
    history: list[dict],
    y_true: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
) -> None:
    """Test metrics, the per-class report and the two plots, on the run."""
    import mlflow

    from pipeline.evaluate import confusion_matrix_png, loss_curve_png

    client = mlflow.MlflowClient()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    scalars = [
        Metric(f"test_{k}", float(metrics[k]), now, 0) for k in ("accuracy", "macro_f1", "log_loss")
    ]
    client.log_batch(run_id, metrics=scalars)
    client.log_dict(run_id, metrics["per_class"], "evaluation/per_class.json")
    with tempfile.TemporaryDirectory() as tmp:
        cm = confusion_matrix_png(
            y_true, probs.argmax(1), num_classes, Path(tmp) / "confusion_matrix.png"
        )
        lc = loss_curve_png(history, Path(tmp) / "loss_curve.png")
        client.log_artifact(run_id, str(cm), "evaluation")
        client.log_artifact(run_id, str(lc), "evaluation")


def log_model(run_id: str, predictor: Predictor, example_rows: np.ndarray) -> str:
    """Log the model as a pyfunc (models-from-code, no pickle) that applies its preprocessor.

    `mlflow models serve -m models:/NAME@champion` then serves raw feature rows.
    """
    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    names = list(predictor.feature_names)
    example = pd.DataFrame(example_rows[:2].astype(np.float32), columns=names)
    probs = predictor.predict_proba(example.to_numpy())
    output = pd.DataFrame(probs, columns=[f"prob_{i}" for i in range(probs.shape[1])])
    output.insert(0, "label", probs.argmax(1))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow hints about integer output columns and type hints: not relevant to this model.
        warnings.simplefilter("ignore", UserWarning)
        model_dir = Path(tmp) / "model_dir"  # the artifact keeps this directory's name
        predictor.save(model_dir)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={"model_dir": str(model_dir)},
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=_requirements(torch.__version__),
            )
    return info.model_uri


def _requirements(torch_version: str) -> list[str]:
    from importlib.metadata import version

    return (
        [f"torch=={torch_version.split('+')[0]}"]
        + [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "numpy", "pandas", "pyarrow")]
        + ["mlops-loop  # this project: pip install -e <checkout>"]
    )


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register a logged model as a new version of `name`; returns the version string."""
    import mlflow

    mv = with_retries(
        "registering the model", lambda: mlflow.register_model(model_uri, name, tags=tags)
    )
    return str(mv.version)


def download_model(name: str, ref: str, dst: Path | None = None) -> tuple[Path, object]:
    """Fetch version `ref` (a number or an alias) of `name`; returns (model dir, ModelVersion)."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = with_retries(f"resolving {name}:{ref}", lambda: _resolve(client, name, ref))
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


def _resolve(client, name: str, ref: str):
    from mlflow.exceptions import MlflowException

    try:
        if str(ref).isdigit():
            return client.get_model_version(name, str(ref))
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        if _is_unreachable(exc):
            raise
        raise RegistryError(f"{name}: no version {ref!r} in the registry") from exc


def alias_version(name: str, alias: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()

    def get() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if _is_unreachable(exc):
                raise
            return None

    return with_retries(f"reading @{alias}", get)


# --- promotion gate and ledger ---------------------------------------------------------


@dataclass
class Decision:
    promoted: bool
    candidate: str
    champion: str | None
    candidate_score: float
    champion_score: float | None
    reason: str


def score(predictor: Predictor, x: np.ndarray, y: np.ndarray) -> float:
    return float((predictor.predict(x) == y).mean())


def promote_if_better(
    settings, candidate: str, x_test: np.ndarray, y_test: np.ndarray, margin: float = 0.0
) -> Decision:
    """Champion and candidate are both scored on the same current test set (raw features)."""
    name = settings.model_name
    cand_pred, _ = load_predictor(name, candidate)
    cand_score = score(cand_pred, x_test, y_test)
    champion = alias_version(name, CHAMPION)
    if champion is None:
        decision = Decision(True, candidate, None, cand_score, None, "first version")
    elif champion == candidate:
        decision = Decision(False, candidate, champion, cand_score, cand_score, "already champion")
        return decision
    else:
        champ_pred, _ = load_predictor(name, champion)
        champ_score = score(champ_pred, x_test, y_test)
        better = cand_score > champ_score + margin
        reason = (
            f"accuracy {cand_score:.4f} vs champion {champ_score:.4f} "
            f"({'beats' if better else 'does not beat'} it by more than {margin})"
        )
        decision = Decision(better, candidate, champion, cand_score, champ_score, reason)
    _apply(settings, decision)
    return decision


def _apply(settings, d: Decision) -> None:
    import mlflow

    client, name = mlflow.MlflowClient(), settings.model_name
    if d.promoted:
        with_retries(
            "setting @champion",
            lambda: client.set_registered_model_alias(name, CHAMPION, d.candidate),
        )
        if d.champion:
            with_retries(
                "setting @challenger",
                lambda: client.set_registered_model_alias(name, CHALLENGER, d.champion),
            )
    else:
        with_retries(
            "setting @challenger",
            lambda: client.set_registered_model_alias(name, CHALLENGER, d.candidate),
        )
    action = "promote" if d.promoted else "reject"
    record(
        settings,
        action,
        d.champion,
        d.candidate if d.promoted else d.champion,
        d.reason,
        {"candidate_accuracy": d.candidate_score, "champion_accuracy": d.champion_score},
        candidate=d.candidate,
    )
    log.info("%s v%s: %s", action, d.candidate, d.reason)


def set_champion(settings, version: str, reason: str = "manual promotion") -> None:
    """`mlops promote VERSION`: make an existing version the champion."""
    import mlflow

    client, name = mlflow.MlflowClient(), settings.model_name
    with_retries("resolving the version", lambda: _resolve(client, name, version))
    current = alias_version(name, CHAMPION)
    if current == str(version):
        raise RegistryError(f"v{version} is already the champion")
    with_retries(
        "setting @champion", lambda: client.set_registered_model_alias(name, CHAMPION, str(version))
    )
    if current:
        client.set_registered_model_alias(name, CHALLENGER, current)
    record(settings, "promote", current, str(version), reason, {}, candidate=str(version))


def rollback(settings, reason: str = "manual rollback") -> tuple[str, str]:
    """Make the champion before the current one the champion again; returns (from, to)."""
    import mlflow

    client, name = mlflow.MlflowClient(), settings.model_name
    stack = champion_history(settings)
    current = alias_version(name, CHAMPION)
    if len(stack) < 2 or current is None:
        raise RegistryError("no previous champion to roll back to")
    target = stack[-2]
    with_retries(
        "setting @champion", lambda: client.set_registered_model_alias(name, CHAMPION, target)
    )
    client.set_registered_model_alias(name, CHALLENGER, current)
    record(settings, "rollback", current, target, reason, {})
    return current, target


def record(
    settings,
    action: str,
    from_version: str | None,
    to_version: str | None,
    reason: str,
    metrics: dict,
    candidate: str | None = None,
) -> None:
    """Append one entry to the promotion ledger."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = with_retries(
        "opening the ledger", lambda: _experiment_id(settings, f"{settings.model_name}-promotions")
    )
    tags = {
        "ledger.action": action,
        "ledger.from_version": from_version or "",
        "ledger.to_version": to_version or "",
        "ledger.candidate": candidate or "",
        "ledger.reason": reason,
        "ledger.seq": str(time.time_ns()),
        "ledger.actor": _actor(),
    }
    run = client.create_run(exp, run_name=f"{action} v{candidate or to_version}", tags=tags)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    if batch:
        client.log_batch(run.info.run_id, metrics=batch)
    client.set_terminated(run.info.run_id)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def ledger(settings, limit: int = 1000) -> list[dict]:
    """Ledger entries, newest first."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(f"{settings.model_name}-promotions")
    if exp is None:
        return []
    runs = with_retries(
        "reading the ledger",
        lambda: client.search_runs(
            [exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
        ),
    )
    entries = [
        {
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000)),
            "action": r.data.tags.get("ledger.action"),
            "from": r.data.tags.get("ledger.from_version") or None,
            "to": r.data.tags.get("ledger.to_version") or None,
            "candidate": r.data.tags.get("ledger.candidate") or None,
            "reason": r.data.tags.get("ledger.reason"),
            "seq": int(r.data.tags.get("ledger.seq", "0")),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]
    return sorted(entries, key=lambda e: e["seq"], reverse=True)


def champion_history(settings) -> list[str]:
    """Champions in order, replaying the ledger: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for entry in reversed(ledger(settings)):
        if entry["action"] == "promote" and entry["to"]:
            stack.append(entry["to"])
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    return stack


def status(settings) -> dict:
    """Champion and challenger with their data versions and test accuracy, plus the ledger."""
    import mlflow

    client, name = mlflow.MlflowClient(), settings.model_name
    out: dict = {"model": name, "tracking_uri": mlflow.get_tracking_uri()}
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
    out["ledger"] = ledger(settings, limit=10)
    return out
