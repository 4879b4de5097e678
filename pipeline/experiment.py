"""One training experiment as library calls: (tune) -> train -> evaluate -> log -> register.

Used by `mlops train`, the torchrun entry point and the Prefect flows, which wrap the
same steps as tasks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.evaluate import classification_metrics
from pipeline.model import Predictor
from pipeline.preprocess import features_labels
from pipeline.train import SplitData, TrainParams, TrainResult, train_model

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    run_id: str
    model_uri: str
    metrics: dict
    version: str | None = None
    warm_started: bool = False


def raw_test_set(settings, schema) -> tuple[np.ndarray, np.ndarray]:
    """Raw (untransformed) test features and labels: what a client would send."""
    return features_labels(pd.read_parquet(settings.processed_dir / "test.parquet"), schema)


def start_run(settings, params: dict, tp: TrainParams, run_name: str, extra_tags: dict) -> str:
    """Create the training run with its params and lineage tags; returns the run id."""
    import mlflow

    from pipeline.lineage import data_version, lineage_tags
    from pipeline.registry import configure_tracking, with_retries

    experiment = configure_tracking(settings)
    version = data_version(settings.processed_dir)
    tags = lineage_tags(
        settings.root,
        version["data_hash"],
        str(params["data"]["source"]),
        extra_tags.pop("device", "cpu"),
        extra_tags.pop("warm_start", False),
    )
    tags.update({k: str(v) for k, v in extra_tags.items()})
    client = mlflow.MlflowClient()
    run = with_retries(
        "creating the training run",
        lambda: client.create_run(experiment, run_name=run_name, tags=tags),
    )
    flat = {
        **asdict(tp),
        **{f"split_{k}": v for k, v in params["split"].items()},
        "rows_train": version["rows"].get("train"),
        "data_hash": version["data_hash"],
    }
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
    return run.info.run_id


def finish_run(
    settings, run_id: str, result: TrainResult, data: SplitData, out_dir: Path
) -> Candidate:
    """Evaluate on the test split, save the checkpoint, log plots and the pyfunc model."""
    import mlflow

    from pipeline.registry import log_evaluation, log_model

    predictor = Predictor(result.model, result.cfg, data.preprocessor, "cpu")
    raw_x, _ = raw_test_set(settings, data.preprocessor.schema)
    probs = predictor.predict_proba(raw_x)
    metrics = classification_metrics(data.y["test"], probs, result.cfg.num_classes)
    predictor.save(out_dir)
    client = mlflow.MlflowClient()
    log_evaluation(run_id, metrics, result.history, data.y["test"], probs, result.cfg.num_classes)
    client.log_batch(run_id, metrics=_train_summary(result))
    model_uri = log_model(run_id, predictor, raw_x)
    client.set_terminated(run_id)
    log.info(
        "test accuracy %.4f, macro F1 %.4f (run %s)",
        metrics["accuracy"],
        metrics["macro_f1"],
        run_id,
    )
    return Candidate(run_id, model_uri, metrics, warm_started=result.warm_started)


def _train_summary(result: TrainResult) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "train_seconds": result.seconds,
        "samples_per_s": result.samples_per_s,
    }
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def champion_state(settings, hidden: int) -> tuple[dict | None, str | None]:
    """The champion's weights for a warm start, when its architecture matches."""
    from pipeline.model import CHECKPOINT
    from pipeline.registry import CHAMPION, alias_version, download_model

    version = alias_version(settings.model_name, CHAMPION)
    if version is None:
        return None, None
    model_dir, _ = download_model(settings.model_name, version)
    import torch

    blob = torch.load(model_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    schema = json.loads((model_dir / "preprocessor.json").read_text())["schema"]
    n = len(schema["feature_names"])
    if blob["config"]["hidden"] != hidden or blob["config"]["n_features"] != n:
        log.warning("champion v%s has another architecture: training from scratch", version)
        return None, None
    return blob["state_dict"], version


def fit(
    settings,
    params: dict,
    *,
    trials: int = 0,
    epochs: int | None = None,
    warm_start: bool = False,
    register: bool = True,
    run_name: str = "train",
    show_progress: bool = True,
) -> Candidate:
    """Tune (when trials > 0), train the final model, evaluate, log it, and register it."""
    import mlflow

    from pipeline.model import choose_device
    from pipeline.registry import configure_tracking
    from pipeline.tune import tune

    device = choose_device(settings.device)
    data = SplitData.load(settings.processed_dir)
    tp = TrainParams.from_params(params, epochs=epochs)
    experiment = configure_tracking(settings)
    if trials > 0:
        tune_cfg = params.get("tune", {})
        with mlflow.start_run(experiment_id=experiment, run_name=f"{run_name}-tune"):
            best = tune(
                data,
                replace(tp, epochs=min(tp.epochs, tune_cfg.get("epochs", tp.epochs))),
                tune_cfg.get("space", {}),
                trials,
                tune_cfg.get("timeout_s"),
                str(device),
            )
        tp = replace(tp, **best.best_params)
    if settings.train_processes > 1:
        candidate = fit_distributed(settings, tp, settings.train_processes, run_name)
        return _register(settings, candidate) if register else candidate
    init_state, warm_from = champion_state(settings, tp.hidden) if warm_start else (None, None)
    run_id = start_run(
        settings,
        params,
        tp,
        run_name,
        {
            "device": str(device),
            "warm_start": init_state is not None,
            "warm_start_from": warm_from or "",
            "tuning_trials": trials,
        },
    )
    try:
        result = train_model(
            data,
            tp,
            device,
            init_state=init_state,
            on_epoch=_epoch_logger(run_id),
            show_progress=show_progress,
        )
        candidate = finish_run(settings, run_id, result, data, settings.models_dir)
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise
    return _register(settings, candidate) if register else candidate


def _register(settings, candidate: Candidate) -> Candidate:
    import mlflow

    from pipeline.registry import register as register_model

    run = mlflow.MlflowClient().get_run(candidate.run_id)
    tags = dict(run.data.tags)
    keys = ("git_commit", "git_dirty", "data_hash", "data_source", "device", "warm_start")
    lineage = {k: tags[k] for k in keys if k in tags}
    train_keys = [f.name for f in fields(TrainParams)]
    lineage["params"] = json.dumps(
        {k: run.data.params[k] for k in train_keys if k in run.data.params}, sort_keys=True
    )
    candidate.version = register_model(candidate.model_uri, settings.model_name, lineage)
    return candidate


def fit_distributed(settings, tp: TrainParams, processes: int, run_name: str) -> Candidate:
    """The final training under `torchrun` DDP; rank 0 logs the one run and the model."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        params_file, result_file = Path(tmp) / "train.json", Path(tmp) / "result.json"
        params_file.write_text(json.dumps(asdict(tp)))
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "pipeline.train",
            "--no-progress",
            "--run-name",
            run_name,
            "--train-params",
            str(params_file),
            "--result",
            str(result_file),
        ]
        env = {**os.environ, "MLOPS_ROOT": str(settings.root)}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log.info("training with torchrun over %d processes", processes)
        done = subprocess.run(cmd, env=env, cwd=settings.root, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(result_file.read_text())
    return Candidate(result["run_id"], result["model_uri"], result["metrics"])


def _epoch_logger(run_id: str):
    from pipeline.registry import EpochLogger

    return EpochLogger(run_id)
