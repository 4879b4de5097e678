"""Drift detection and the retraining trigger."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MonitorParams
from pipeline.drift import detect_drift, psi, should_retrain
from pipeline.ingest import load_digits_frame


def _digits():
    """All digits in a random order (the file's order groups writers: itself a drift)."""
    frame = load_digits_frame("all").sample(frac=1.0, random_state=0)
    return frame.drop(columns="label").to_numpy(np.float32), [f"pixel{i}" for i in range(64)]


def _probs(n: int, confidence: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probs = np.full((n, 10), (1 - confidence) / 9, np.float32)
    probs[np.arange(n), rng.integers(0, 10, n)] = confidence
    return probs


def test_same_distribution_is_not_drift():
    x, names = _digits()
    report = detect_drift(x[:900], x[900:], names, _probs(900, 0.9), _probs(897, 0.9, 1), 0.2)
    assert report.score < 0.1 and not report.drifted
    assert report.class_psi < 0.1 and abs(report.confidence_drop) < 1e-6


def test_shifted_images_are_drift():
    x, names = _digits()
    images = x[900:].reshape(-1, 8, 8)
    shifted = np.zeros_like(images)
    shifted[:, :, 2:] = images[:, :, :-2]
    report = detect_drift(
        x[:900], shifted.reshape(-1, 64), names, _probs(900, 0.95), _probs(897, 0.6, 1), 0.2
    )
    assert report.drifted and report.score > 0.5
    assert report.confidence_drop == pytest.approx(0.35, abs=1e-6)
    # the shift empties the two left columns: pixels that carry ink in the reference
    assert {"pixel2", "pixel10", "pixel58"} <= set(report.drifted_features)


def test_too_few_rows_is_refused():
    x, names = _digits()
    with pytest.raises(ValueError, match="at least 20"):
        detect_drift(x[:100], x[:5], names, _probs(100, 0.9), _probs(5, 0.9), 0.2)


def test_psi_is_zero_for_equal_and_grows_with_shift():
    a = np.array([10, 10, 10, 10.0])
    assert psi(a, a) == pytest.approx(0)
    assert psi(a, np.array([40, 0, 0, 0.0])) > psi(a, np.array([20, 10, 5, 5.0])) > 0


CFG = MonitorParams(min_new_labels=100, drift_threshold=0.2, cooldown_s=600)


@pytest.mark.parametrize(
    ("labels", "drift", "last", "running", "go", "why"),
    [
        (150, None, None, False, True, "150 new labels"),
        (50, 0.5, None, False, True, "drift score 0.50"),
        (50, 0.1, None, False, False, "below both thresholds"),
        (500, 0.9, 1000 - 60, False, False, "cooldown"),
        (500, 0.9, 1000 - 601, False, True, "500 new labels"),
        (500, 0.9, None, True, False, "already in progress"),
    ],
)
def test_trigger(labels, drift, last, running, go, why):
    decision, reason = should_retrain(labels, drift, last, 1000.0, running, CFG)
    assert decision is go and why in reason
