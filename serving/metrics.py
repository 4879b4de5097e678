"""Prometheus metrics of the server (multi-process aware when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUESTS = Counter("mlops_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "mlops_request_seconds",
    "HTTP request latency",
    ["route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_ROWS = Histogram(
    "mlops_batch_rows",
    "Rows per forward pass (micro-batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
LOG_QUEUE = Gauge(
    "mlops_log_queue_depth",
    "Prediction rows waiting for the log writer",
    multiprocess_mode="livesum",
)
COMMIT_LAG = Histogram(
    "mlops_log_commit_lag_seconds",
    "From prediction to committed log row",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
LOGGED = Counter("mlops_predictions_logged_total", "Prediction rows committed to the log")
LOG_FAILURES = Counter("mlops_log_failures_total", "Failed log commits (store unavailable)")
MODEL_VERSION = Gauge(
    "mlops_model_version", "Loaded model version (numeric)", multiprocess_mode="max"
)
OUT_OF_RANGE = Counter(
    "mlops_rows_out_of_range_total",
    "Request rows outside the serving model's training ranges (flagged or refused)",
)
LOAD_FAILURES = Counter("mlops_model_load_failures_total", "Failed model loads or reloads")
DRIFT = Gauge(
    "mlops_drift_score",
    "Latest input drift score (share of drifted features)",
    multiprocess_mode="max",
)

SHADOW_ROWS = Counter(
    "mlops_shadow_rows_total",
    "Rows offered to the shadow version, by outcome (scored, agreed, skipped, failed)",
    ["outcome"],
)
SHADOW = Gauge(
    "mlops_shadow",
    "Shadow figures over the server's lifetime, from the prediction store: agreement with "
    "the champion, labelled rows, and both versions' accuracy on the same labelled rows",
    ["figure"],
    multiprocess_mode="max",
)
CANARY_ROWS = Counter(
    "mlops_canary_rows_total",
    "Rows routed to a canary candidate, by outcome (served, failed: answered by the champion)",
    ["outcome"],
)
CANARY_FRACTION = Gauge(
    "mlops_canary_fraction", "Share of clients the running canary takes (0: none)",
    multiprocess_mode="max",
)  # fmt: skip

PERFORMANCE = Gauge(
    "mlops_live_performance",
    "The monitor's latest window per model version (pipeline/performance.py): label "
    "coverage, label latency p50 (s), realized accuracy (mature windows only), estimated "
    "accuracy and its 95% bounds",
    ["version", "figure"],
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
