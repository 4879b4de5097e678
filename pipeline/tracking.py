"""MLflow tracking: the store, bounded retries, training runs and what is logged on them.

Conventions: the experiment is named after the registered model; a run's tags carry its
lineage (git commit, data hash, source, device); metrics are logged one batch per epoch; the
model is logged as a pyfunc at artifact path `model` (models-from-code, no pickle).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import AnyType, ColSpec, Schema

from pipeline.config import Params, Settings
from pipeline.evaluate import confusion_matrix_png, loss_curve_png
from pipeline.lineage import data_version, lineage_tags
from pipeline.model import Predictor
from pipeline.redact import redact

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
T = TypeVar("T")


class RegistryUnavailable(RuntimeError):
    """The tracking server / registry could not be reached; nothing was changed."""


def configure_tracking(settings: Settings) -> str:
    """Point MLflow at the configured store; return the experiment id for the model."""
    # Bounded retries: a registry that is down fails in seconds, not after MLflow's default minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = with_retries(
        f"opening experiment {settings.model_name!r}",
        lambda: experiment_id(settings, settings.model_name),
    )
    mlflow.set_experiment(experiment_id=experiment)  # nested runs land beside their parent
    return experiment


# MLflow 3's UI opens an experiment by its kind; without the tag it guesses, and a training
# experiment landed on an empty GenAI "Overview" page ("Traces 0").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The UI's own "shared view": a view state kept as an experiment tag, opened with
# ?viewStateShareKey=KEY, so the run list shows the columns that matter without clicking.
VIEW_KEY = "mlops"
TRAINING_COLUMNS = (
    "attributes.`Models`",
    "metrics.`test_accuracy`",
    "metrics.`test_macro_f1`",
    "metrics.`best_val_accuracy`",
    "params.`data_hash`",
    "params.`epochs`",
    "params.`batch_size`",
)
LEDGER_COLUMNS = (
    "params.`action`",
    "params.`from`",
    "params.`to`",
    "metrics.`candidate_accuracy`",
    "metrics.`champion_accuracy`",
    "params.`reason`",
)


def ui_tags(columns: tuple[str, ...]) -> dict[str, str]:
    view = {"selectedColumns": list(columns), "orderByKey": "attributes.start_time"}
    return {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def ui_runs_url(base: str, experiment: str) -> str:
    """The MLflow UI's run list of `experiment` as model training, with the project's view."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs?{query}"


def experiment_id(
    settings: Settings, name: str, columns: tuple[str, ...] = TRAINING_COLUMNS
) -> str:
    """The id of experiment `name`, created (with artifacts under the root) when missing,
    tagged so the MLflow UI opens it as model training with `columns` in its run list."""
    tags = ui_tags(columns)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        client = mlflow.MlflowClient()
        for key, value in tags.items():  # an experiment made by an older release
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    local = not settings.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = f"{settings.artifact_location}/{name}" if local else None
    return mlflow.create_experiment(name, artifact_location=location, tags=tags)


def with_retries(action: str, fn: Callable[[], T], attempts: int = 3, delay: float = 0.5) -> T:
    """Call `fn`; on a connection failure retry with backoff, then raise RegistryUnavailable."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_unreachable(exc):
                raise
            if attempt == attempts:
                raise RegistryUnavailable(
                    redact(
                        f"MLflow at {mlflow.get_tracking_uri()} is unreachable ({action}; "
                        f"{attempts} attempts): {_first_line(exc)}"
                    )
                ) from exc
            log.warning("registry unreachable (%s), retry %d/%d", action, attempt, attempts - 1)
            time.sleep(delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def is_unreachable(exc: BaseException) -> bool:
    """A connection failure (worth a retry), as opposed to a request that cannot succeed."""
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


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- training runs --------------------------------------------------------------------------


def start_run(
    settings: Settings,
    params: Params,
    train_params: dict,
    run_name: str,
    device: str,
    warm_start: bool = False,
    extra_tags: dict | None = None,
) -> str:
    """Create the training run with its params and lineage tags; returns the run id."""
    experiment = configure_tracking(settings)
    version = data_version(settings.processed_dir)
    tags = lineage_tags(settings.root, version["data_hash"], params.data.source, device, warm_start)
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    client = mlflow.MlflowClient()
    run = with_retries(
        "creating the training run",
        lambda: client.create_run(experiment, run_name=run_name, tags=tags),
    )
    flat = {
        **train_params,
        **{f"split_{k}": v for k, v in params.split.model_dump().items()},
        "rows_train": version["rows"].get("train"),
        "data_hash": version["data_hash"],
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
    return run.info.run_id


def end_run(run_id: str, failed: bool = False) -> None:
    mlflow.MlflowClient().set_terminated(run_id, status="FAILED" if failed else "FINISHED")


class EpochLogger:
    """Logs one batch of metrics per epoch (never one call per step)."""

    def __init__(self, run_id: str, prefix: str = "") -> None:
        self.client, self.run_id, self.prefix = mlflow.MlflowClient(), run_id, prefix

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        now = _now_ms()
        batch = [Metric(self.prefix + k, float(v), now, epoch) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)


def log_metrics(run_id: str, values: dict[str, float]) -> None:
    """Scalars at step 0, one batch."""
    now = _now_ms()
    batch = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]
    if batch:
        mlflow.MlflowClient().log_batch(run_id, metrics=batch)


def log_evaluation(
    run_id: str,
    metrics: dict,
    history: list[dict],
    y_true: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
) -> None:
    """Test metrics, the per-class report and the two plots, on the run."""
    client = mlflow.MlflowClient()
    log_metrics(run_id, {f"test_{k}": metrics[k] for k in ("accuracy", "macro_f1", "log_loss")})
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
    import torch

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
                signature=_signature(names, output),
                input_example=example,
                pip_requirements=_requirements(torch.__version__),
            )
    return info.model_uri


def _signature(names: list[str], output: pd.DataFrame) -> ModelSignature:
    """Named feature columns of any numeric type. A float32 (or double) column type makes
    MLflow's schema enforcement refuse the data users have: pixel CSVs read as int64
    ("Can not safely convert int64 to float32") and float64. The model casts to float32
    itself, after checking the columns are there, which MLflow still enforces by name."""
    inputs = Schema([ColSpec(AnyType(), name) for name in names])
    return ModelSignature(inputs=inputs, outputs=infer_signature(None, output).outputs)


def _requirements(torch_version: str) -> list[str]:
    from importlib.metadata import version

    return (
        [f"torch=={torch_version.split('+')[0]}"]
        + [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "numpy", "pandas", "pyarrow")]
        + ["mlops-loop  # this project: pip install -e <checkout>"]
    )
