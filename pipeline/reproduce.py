"""`mlops lineage` and `mlops reproduce`: walk a prediction back to its data, and rebuild a
model version from that data with the same parameters."""

from __future__ import annotations

import logging
from dataclasses import fields

import mlflow
import pandas as pd

from pipeline.config import Params, Settings
from pipeline.experiment import warm_start_weights
from pipeline.feedback import BOOTSTRAP, training_frames
from pipeline.ingest import read_fixed_test
from pipeline.lineage import DataVersionError, restore_data
from pipeline.model import Predictor
from pipeline.preprocess import preprocess_frames, raw_test_set
from pipeline.registry import RegistryError, load_predictor, resolve
from pipeline.store import PredictionStore
from pipeline.tracking import configure_tracking, with_retries
from pipeline.train import SplitData, TrainParams, train_model

log = logging.getLogger(__name__)


def trace(settings: Settings, prediction_id: str) -> dict:
    """prediction -> model version -> MLflow run -> git commit -> data version -> location."""
    store = PredictionStore(settings.prediction_db)
    try:
        row = store.get([prediction_id]).get(prediction_id)
    finally:
        store.dispose()
    if row is None:
        raise RegistryError(f"no prediction with id {prediction_id!r} in {store.safe_url}")
    configure_tracking(settings)
    mv = resolve(row["model_name"], row["model_version"])
    run = with_retries("reading the run", lambda: mlflow.MlflowClient().get_run(mv.run_id))
    tags = run.data.tags
    data_hash = tags.get("data_hash", "unknown")
    return {
        "prediction": {
            "id": prediction_id,
            "label": row["label"],
            "true_label": row["true_label"],
            "created_at": row["created_at"],
        },
        "model": {"name": row["model_name"], "version": row["model_version"], "source": mv.source},
        "run": {
            "id": mv.run_id,
            "experiment_id": run.info.experiment_id,
            "params": dict(run.data.params),
            "test_accuracy": run.data.metrics.get("test_accuracy"),
        },
        "code": {"git_commit": tags.get("git_commit"), "git_dirty": tags.get("git_dirty")},
        "data": {
            "hash": data_hash,
            "source": tags.get("data_source"),
            "source_hash": tags.get("data_source_hash") or None,
            "where": _where(settings, data_hash, row["model_version"]),
        },
    }


def _where(settings, data_hash: str, version: str) -> dict:
    """Where the bytes of a data version live: the DVC cache and the default remote."""
    digest = data_hash.removesuffix(".dir")
    cache = (
        settings.root
        / ".dvc"
        / "cache"
        / "files"
        / "md5"
        / digest[:2]
        / (digest[2:] + (".dir" if data_hash.endswith(".dir") else ""))
    )
    where = {
        "dvc_cache": str(cache),
        "in_cache": cache.exists(),
        "restore": f"mlops reproduce {version}",
    }
    try:
        from dvc.repo import Repo

        with Repo(str(settings.root)) as repo:
            name = repo.config["core"].get("remote")
            if name:
                where["dvc_remote"] = f"{name}: {repo.config['remote'][name]['url']}"
    except Exception:  # noqa: BLE001 - not a DVC repo: the cache path is all there is
        pass
    return where


def reproduce(settings: Settings, params: Params, version: str) -> dict:
    """Restore the exact data `version` was trained on (hash verified) and retrain it with
    the same parameters on the CPU; returns the original and the reproduced metrics."""
    configure_tracking(settings)
    if not str(version).isdigit():
        raise RegistryError(f"{version!r} is not a version number (see `mlops status`)")
    mv = resolve(settings.model_name, version)
    run = mlflow.MlflowClient().get_run(mv.run_id)
    digest = run.data.tags.get("data_hash", "unknown")
    if digest == "unknown":
        raise DataVersionError(f"v{version} was trained on data DVC did not version")
    work = settings.data_dir / "reproduce" / f"v{version}"
    is_dir = digest.endswith(".dir")
    target = work / ("loop" if is_dir else "dataset.parquet")
    restore_data(settings.root, target, digest)
    fixed = None
    if is_dir:  # the loop's data: the same bootstrap + feedback the flow trained on
        base, extra = training_frames(target)
        fixed = read_fixed_test(target / BOOTSTRAP)
    else:
        base, extra = pd.read_parquet(target), None
    run_params = dict(run.data.params)
    # the class count and the scaling as the version was trained with, from the model
    # itself (every version has them, whatever params.yaml says today: a newcomer's
    # reproduction of a 10-class version under today's 3 trained a 3-class model)
    original_model, _ = load_predictor(settings.model_name, version)
    repro_params = params.updated(
        seed=int(run_params["seed"]),
        split={
            "val_size": float(run_params["split_val_size"]),
            "test_size": float(run_params["split_test_size"]),
        },
        data={"num_classes": original_model.cfg.num_classes},
        preprocess={"scaling": original_model.preprocessor.scaling},
    )
    processed = work / "processed"
    preprocess_frames(base, processed, repro_params, digest, extra, fixed)
    logged = {
        f.name: _cast(f.type, run_params[f.name])
        for f in fields(TrainParams)
        if f.name in run_params
    }
    tp = TrainParams.from_params(repro_params, **logged)  # a key an older run lacks: params
    init = None
    if run.data.tags.get("warm_start") == "true":
        init = warm_start_weights(settings, run.data.tags["warm_start_from"])
    data = SplitData.load(processed, from_shards=run.data.tags.get("train_data") == "shards")
    result = train_model(data, tp, "cpu", init_state=init, show_progress=False)
    predictor = Predictor(result.model, result.cfg, data.preprocessor)
    x, y = raw_test_set(processed, data.preprocessor.schema)
    reproduced = predictor.predict(x)
    accuracy = float((reproduced == y).mean())
    original = run.data.metrics.get("test_accuracy")
    # the same accuracy is not enough: the same answer for every test row, by a model of
    # the same architecture
    differ = (
        len(y)
        if result.cfg != original_model.cfg
        else int((original_model.predict(x) != reproduced).sum())
    )
    return {
        "version": version,
        "data_hash": digest,
        "data_dir": str(target),
        "params": {k: getattr(tp, k) for k in ("epochs", "batch_size", "lr", "hidden")},
        "original_test_accuracy": original,
        "reproduced_test_accuracy": accuracy,
        "test_rows": len(y),
        "predictions_differ": differ,
        "match": original is not None and abs(original - accuracy) < 1e-12 and differ == 0,
        "original_device": run.data.tags.get("device"),
    }


def _cast(kind, value: str):
    kind = str(kind)
    if "bool" in kind:
        return value == "True"
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value
