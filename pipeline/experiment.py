"""One training experiment as library calls: (tune) -> train -> evaluate -> log -> register.

Used by `mlops train`, the torchrun entry point (pipeline/ddp.py) and the Prefect flows,
which wrap the same steps as tasks. The training loop itself (pipeline/train.py) knows
nothing of MLflow; this module connects it to tracking and the registry.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from pipeline import progress
from pipeline.config import Params, Settings
from pipeline.evaluate import classification_metrics
from pipeline.model import (
    CHECKPOINT,
    ModelConfig,
    Predictor,
    build_model,
    choose_device,
    count_parameters,
    read_checkpoint,
)
from pipeline.performance import Calibration
from pipeline.preprocess import PREPROCESSOR_FILE, Preprocessor, features_labels, raw_test_set
from pipeline.registry import CHAMPION, alias_version, download_model, register
from pipeline.shards import train_from_shards
from pipeline.tracking import (
    EpochLogger,
    configure_tracking,
    end_run,
    log_evaluation,
    log_metrics,
    log_model,
    start_run,
)
from pipeline.train import SplitData, TrainParams, TrainResult, train_model
from pipeline.tune import tune
from pipeline.validate import LABEL, Schema

log = logging.getLogger(__name__)

LINEAGE_TAGS = (
    "git_commit",
    "git_dirty",
    "data_hash",
    "data_source",
    "data_source_hash",
    "device",
    "warm_start",
)


@dataclass
class Candidate:
    run_id: str
    model_uri: str
    metrics: dict
    version: str | None = None
    warm_started: bool = False


def finish_run(
    settings: Settings, run_id: str, result: TrainResult, data: SplitData, out_dir: Path
) -> Candidate:
    """Evaluate on the test split, save the checkpoint, log plots and the pyfunc model."""
    predictor = Predictor(result.model, result.cfg, data.preprocessor, "cpu")
    # for estimating live accuracy without labels (pipeline/performance.py)
    predictor.calibration = Calibration.fit(predictor.probabilities(data.x["val"]), data.y["val"])
    raw_x, _ = raw_test_set(settings.processed_dir, data.preprocessor.schema)
    probs = predictor.predict_proba(raw_x)
    metrics = classification_metrics(data.y["test"], probs, result.cfg.num_classes)
    predictor.save(out_dir)
    log_evaluation(run_id, metrics, result.history, data.y["test"], probs, result.cfg.num_classes)
    log_metrics(
        run_id,
        {
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "best_val_accuracy": result.best_val_accuracy,
            "train_seconds": result.seconds,
            "samples_per_s": result.samples_per_s,
        },
    )
    model_uri = log_model(run_id, predictor, raw_x)
    end_run(run_id)
    log.info(
        "test accuracy %.4f, macro F1 %.4f (run %s)",
        metrics["accuracy"],
        metrics["macro_f1"],
        run_id,
    )
    return Candidate(run_id, model_uri, metrics, warm_started=result.warm_started)


def champion_state(settings: Settings, hidden: int) -> tuple[dict | None, str | None]:
    """The champion's weights for a warm start, when its architecture matches."""
    version = alias_version(settings.model_name, CHAMPION)
    if version is None:
        return None, None
    model_dir, _ = download_model(settings.model_name, version)
    cfg, state = read_checkpoint(model_dir / CHECKPOINT)
    schema = Schema.from_dict(json.loads((model_dir / PREPROCESSOR_FILE).read_text())["schema"])
    if cfg != ModelConfig.for_schema(schema, hidden, cfg.dropout):
        log.warning("champion v%s has another architecture: training from scratch", version)
        return None, None
    return state, version


def fit(
    settings: Settings,
    params: Params,
    *,
    trials: int = 0,
    epochs: int | None = None,
    warm_start: bool = False,
    register_model: bool = True,
    run_name: str = "train",
    show_progress: bool = True,
    source_hash: str = "",
) -> Candidate:
    """Tune (when trials > 0), train the final model, evaluate, log it, and register it.
    `source_hash` (the ingest report's) tags the run beside `params.data.source`."""
    device = choose_device(settings.device)
    shards = train_from_shards(params, settings.processed_dir)
    data = SplitData.load(settings.processed_dir, from_shards=shards)
    log.info("training split: %s", "read from its Parquet shards" if shards else "in memory")
    tp = TrainParams.from_params(params, epochs=epochs)
    experiment = configure_tracking(settings)
    if trials > 0:
        with mlflow.start_run(experiment_id=experiment, run_name=f"{run_name}-tune"):
            best = tune(
                data,
                replace(tp, epochs=min(tp.epochs, params.tune.epochs)),
                params.tune.space,
                trials,
                params.tune.timeout_s,
                str(device),
            )
        tp = replace(tp, **best.best_params)
    description = describe_model(data, tp)
    log.info("model: %s", description)
    unused = unused_classes_warning(data)
    if unused:
        log.warning(unused)
    if settings.train_processes > 1:
        if warm_start:
            log.warning("warm start is not supported under torchrun: training from scratch")
        candidate = fit_distributed(settings, params, tp, settings.train_processes, run_name)
        return register_candidate(settings, candidate) if register_model else candidate
    init_state, warm_from = champion_state(settings, tp.hidden) if warm_start else (None, None)
    progress.report("phase", name="final model", epochs=tp.epochs)
    run_id = start_run(
        settings,
        params,
        tp.to_dict(),
        run_name,
        str(device),
        warm_start=init_state is not None,
        extra_tags={
            "warm_start_from": warm_from or "",
            "tuning_trials": trials,
            "data_source_hash": source_hash,
            "model_description": description,
            "train_data": data.train_from,
        },
    )
    try:
        result = train_model(
            data,
            tp,
            device,
            init_state=init_state,
            on_epoch=EpochLogger(run_id),
            show_progress=show_progress,
        )
        candidate = finish_run(settings, run_id, result, data, settings.models_dir)
    except BaseException:
        end_run(run_id, failed=True)
        raise
    return register_candidate(settings, candidate) if register_model else candidate


def unused_classes_warning(data: SplitData) -> str | None:
    """Why training on this data looks misconfigured, where it does: `data.num_classes`
    (10 by default, the digits') above the classes its labels use. The model then gets
    outputs it never learns, and macro F1 averages over classes that are never there (3
    classes under the default: 0.28 where 0.93 with `num_classes: 3`). The labels of every
    split in memory are looked at (not a sharded training split)."""
    classes = data.preprocessor.schema.num_classes
    seen = np.unique(np.concatenate([y for y in data.y.values() if len(y)] or [np.zeros(0)]))
    if len(seen) == 0 or len(seen) == classes:
        return None
    missing = sorted(set(range(classes)) - {int(c) for c in seen})
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    return (
        f"data.num_classes is {classes}, but the labels use {len(seen)} of those classes "
        f"(none of {shown}): the model gets outputs it never learns and macro F1 averages "
        f"over classes that never occur; if the data has {int(seen.max()) + 1} classes, "
        f"set data.num_classes: {int(seen.max()) + 1} in params.yaml"
    )


def describe_model(data: SplitData, tp: TrainParams) -> str:
    """What `fit` builds for this data, and why, with its parameter count."""
    cfg = ModelConfig.for_schema(data.preprocessor.schema, tp.hidden, tp.dropout)
    scaling = data.preprocessor.scaling
    return f"{cfg.describe(count_parameters(build_model(cfg)))}; {scaling} scaling"


def register_candidate(settings: Settings, candidate: Candidate) -> Candidate:
    """Register the run's model with its lineage and training params as version tags, and
    what it is (architecture, why, parameters) as the version's description."""
    run = mlflow.MlflowClient().get_run(candidate.run_id)
    tags = dict(run.data.tags)
    lineage = {k: tags[k] for k in LINEAGE_TAGS if k in tags}
    train_keys = [f.name for f in fields(TrainParams)]
    lineage["params"] = json.dumps(
        {k: run.data.params[k] for k in train_keys if k in run.data.params}, sort_keys=True
    )
    description = run.data.tags.get("model_description")
    candidate.version = register(candidate.model_uri, settings.model_name, lineage, description)
    return candidate


def fit_distributed(
    settings: Settings, params: Params, tp: TrainParams, processes: int, run_name: str
) -> Candidate:
    """The final training under `torchrun` DDP (pipeline/ddp.py); rank 0 logs the one run.
    The ranks get this call's params and training params, not a fresh read of params.yaml."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        params_file, result_file = Path(tmp) / "train.json", Path(tmp) / "result.json"
        params_file.write_text(json.dumps(tp.to_dict()))
        all_params = Path(tmp) / "params.json"
        all_params.write_text(params.model_dump_json())
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "pipeline.ddp",
            "--no-progress",
            "--run-name",
            run_name,
            "--train-params",
            str(params_file),
            "--params",
            str(all_params),
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


def cross_validate(frame: pd.DataFrame, params: Params, k: int = 5, device: str = "cpu") -> dict:
    """Stratified k-fold CV of the whole preprocess+train path: mean and spread of accuracy."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if k < 2:
        raise ValueError("k-fold cross-validation needs k >= 2")
    schema = Schema(tuple(c for c in frame.columns if c != LABEL), params.data.num_classes)
    tp = TrainParams.from_params(params)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=params.seed)
    scores = []
    for fold, (rest, test) in enumerate(folds.split(frame, frame[LABEL]), start=1):
        train, val = train_test_split(
            rest,
            test_size=params.split.val_size,
            stratify=frame[LABEL].iloc[rest],
            random_state=params.seed,
        )
        parts = {"train": frame.iloc[train], "val": frame.iloc[val], "test": frame.iloc[test]}
        pre = Preprocessor.fit(
            features_labels(parts["train"], schema)[0], schema, params.preprocess.scaling
        )
        data = SplitData.from_frames(parts, pre)
        result = train_model(data, tp, device, show_progress=False)
        probs = Predictor(result.model, result.cfg, pre, device).predict_proba(
            features_labels(parts["test"], schema)[0]
        )
        scores.append(float((probs.argmax(1) == data.y["test"]).mean()))
        log.info("fold %d/%d: accuracy %.4f", fold, k, scores[-1])
    return {
        "k": k,
        "accuracy_mean": float(np.mean(scores)),
        "accuracy_std": float(np.std(scores)),
        "folds": scores,
    }


def warm_start_weights(settings: Settings, version: str) -> dict[str, torch.Tensor]:
    """The state dict of a registered version (reproducing a warm-started run)."""
    model_dir, _ = download_model(settings.model_name, version)
    return read_checkpoint(model_dir / CHECKPOINT)[1]
