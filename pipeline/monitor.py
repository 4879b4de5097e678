"""Monitoring the live model: input drift against the training data, and labels that arrived.

What the monitor flow and the loop call; the statistics are pipeline/drift.py's. A drift
check is logged as an MLflow run (metrics, report, plot) and kept in the prediction store,
where the server's /metrics reads the latest score.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import mlflow

from pipeline.config import Params, Settings
from pipeline.drift import MIN_ROWS, detect_drift, drift_plot
from pipeline.feedback import unpulled_labels
from pipeline.performance import Calibration, Window, windows
from pipeline.preprocess import features_labels, load_preprocessor, sample_split
from pipeline.registry import CHAMPION, load_predictor
from pipeline.store import PredictionStore
from pipeline.tracking import configure_tracking

log = logging.getLogger(__name__)

REFERENCE_ROWS = 50_000  # training rows the drift check compares with, at most


def check_drift(settings: Settings, params: Params, since: float) -> dict:
    """Logged inputs since `since` (epoch seconds) against the training split; the report
    as a dict, or {"skipped": why} when too few rows were logged."""
    store = PredictionStore(settings.prediction_db).create()  # a new deployment has none
    try:
        # counted first: too few rows skip the check before the data and the champion are
        # loaded (a new deployment has neither yet)
        logged = store.logged_since(since)
        if logged < MIN_ROWS:
            return {"skipped": f"only {logged} logged rows"}
        schema = load_preprocessor(settings.processed_dir).schema
        configure_tracking(settings)
        predictor, _ = load_predictor(settings.model_name, CHAMPION)
        # float32 arrays decoded chunk by chunk: no Python float per logged value. Only
        # the rows of the champion's shape: the log also holds older models' rows, whose
        # classes (or features) were others before the data changed
        current, cur_probs = store.recent_arrays(
            since,
            chunk_rows=params.data.chunk_rows,
            features=len(schema.feature_names),
            classes=predictor.cfg.num_classes,
        )
        if len(current) < MIN_ROWS:
            return {"skipped": f"only {len(current)} logged rows of the champion's shape"}
        # a seeded sample: a streamed training split need not fit in memory, and the tests
        # lose nothing at this size (bench/drift.py: no false alarms at 10,000-row windows)
        train = sample_split(settings.processed_dir, "train", REFERENCE_ROWS, params.seed)
        reference, _ = features_labels(train, schema)
        cfg = params.monitor
        report = detect_drift(
            reference,
            current,
            list(schema.feature_names),
            predictor.predict_proba(reference),
            cur_probs,
            threshold=cfg.drift_threshold,
            false_alarm_rate=cfg.false_alarm_rate,
            min_effect=cfg.min_effect,
        )
        report.out_of_range_share = float(predictor.preprocessor.out_of_range(current).mean())
        # an alarm only when this window and the k - 1 before it all drifted
        before = store.recent_drift(cfg.persistence - 1) if cfg.persistence > 1 else []
        report.alarm = (
            report.drifted
            and len(before) == cfg.persistence - 1
            and all(r.get("drifted") for r in before)
        )
        store.add_drift(report.score, json.dumps(report.to_dict()))
    finally:
        store.dispose()
    with mlflow.start_run(run_name="drift-check"), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics(
            {
                "drift_score": report.score,
                "class_psi": report.class_psi,
                "confidence_drop": report.confidence_drop,
                "out_of_range_share": report.out_of_range_share,
            }
        )
        mlflow.log_dict(report.to_dict(), "drift/report.json")
        plot = drift_plot(report, reference, current, Path(tmp) / "drift.png")
        mlflow.log_artifact(str(plot), "drift")
    log.info(
        "drift score %.2f (%s), class PSI %.3f, confidence %.3f -> %.3f, %.1f%% rows out of range",
        report.score,
        "ALARM" if report.alarm else "drifted" if report.drifted else "ok",
        report.class_psi,
        report.confidence_reference,
        report.confidence_current,
        100 * report.out_of_range_share,
    )
    return report.to_dict()


def new_labels(settings: Settings) -> int:
    """Labelled predictions not yet pulled into the data (`feedback.unpulled_labels`)."""
    store = PredictionStore(settings.prediction_db).create()  # as the other readers here
    try:
        return unpulled_labels(store, settings.loop_dir)
    finally:
        store.dispose()


_CALIBRATIONS: dict[tuple[str, str, str], Calibration | None] = {}


def calibration_of(settings: Settings, version: str) -> Calibration | None:
    """A version's calibration (fetched once per process: versions are immutable)."""
    key = (mlflow.get_tracking_uri(), settings.model_name, version)
    if key not in _CALIBRATIONS:
        try:
            predictor, _ = load_predictor(settings.model_name, version)
            _CALIBRATIONS[key] = predictor.calibration
        except Exception as exc:  # noqa: BLE001 - a version that cannot load: no estimate
            log.warning("no calibration for v%s: %s", version, exc)
            _CALIBRATIONS[key] = None
    return _CALIBRATIONS[key]


def performance(
    settings: Settings, params: Params, since: float, now: float | None = None
) -> list[Window]:
    """Coverage, label latency, realized (mature windows) and estimated accuracy per model
    version and window of the rows served since `since`."""
    now = time.time() if now is None else now
    store = PredictionStore(settings.prediction_db)
    try:
        rows = store.create().performance_rows(settings.model_name, since)
    finally:
        store.dispose()
    configure_tracking(settings)
    calibrations = {v: calibration_of(settings, v) for v in {r[0] for r in rows}}
    return windows(rows, params.monitor, now, calibrations)


def record_performance(settings: Settings, found: list[Window]) -> None:
    """Keep the figures where the server's /metrics reads them."""
    store = PredictionStore(settings.prediction_db)
    try:
        store.create().add_performance(json.dumps([w.to_dict() for w in found]))
    finally:
        store.dispose()
