"""Drift detection and the retraining trigger."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MonitorParams
from pipeline.drift import (
    TriggerInputs,
    benjamini_hochberg,
    detect_drift,
    feature_test,
    psi,
    should_retrain,
)
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


def test_large_windows_of_unchanged_data_raise_no_alarm_but_a_real_shift_does():
    """10,000 rows resampled from the reference's own distribution: every KS p-value would
    be tiny for the resampling's ties; BH plus the effect size keep it quiet."""
    x, names = _digits()
    rng = np.random.default_rng(1)
    same = x[rng.integers(0, 900, 10_000)]
    quiet = detect_drift(x[:900], same, names, _probs(900, 0.9), _probs(10_000, 0.9), 0.2)
    assert quiet.score == 0.0 and not quiet.drifted
    assert quiet.tests.get("chi2", 0) > 40  # the digits' pixels are categorical (0..16)
    assert max(quiet.effects.values()) < 0.1
    images = same.reshape(-1, 8, 8)
    shifted = np.zeros_like(images)
    shifted[:, :, 1:] = images[:, :, :-1]  # one pixel right
    loud = detect_drift(
        x[:900], shifted.reshape(-1, 64), names, _probs(900, 0.9), _probs(10_000, 0.9), 0.2
    )
    assert loud.drifted and max(loud.effects.values()) > 0.3


def test_benjamini_hochberg_matches_the_procedure():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # q=0.05: the largest k with p_(k) <= k q / m is k=2 (0.008 <= 0.01; 0.039 > 0.015)
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8
    assert benjamini_hochberg(p, 0.5).sum() == 10
    assert benjamini_hochberg(np.array([]), 0.05).tolist() == []


def test_a_categorical_feature_gets_the_chi_square_test_and_a_continuous_one_ks():
    rng = np.random.default_rng(0)
    name, p, effect = feature_test(rng.integers(0, 5, 500), rng.integers(0, 5, 500))
    assert name == "chi2" and p > 0.01 and effect < 0.1
    name, p, effect = feature_test(rng.normal(size=500), rng.normal(0.5, 1, 500))
    assert name == "ks" and p < 1e-6 and 0.1 < effect < 0.4


CFG = MonitorParams(min_new_labels=100, drift_threshold=0.2, cooldown_s=600, max_accuracy_drop=0.05)


def _inputs(**kw) -> TriggerInputs:
    base = dict(
        new_labels=10, drift_score=0.0, drift_alarm=False, realized=None, estimated=None,
        champion_test_accuracy=0.95, last_retrain_at=None, now=1000.0, retrain_running=False,
    )  # fmt: skip
    return TriggerInputs(**{**base, **kw})


@pytest.mark.parametrize(
    ("inputs", "go", "why"),
    [
        (_inputs(new_labels=150), True, "150 new labels (threshold 100)"),
        (_inputs(realized=0.85), True, "realized accuracy 0.850 below 0.900"),
        (_inputs(realized=0.93), False, "realized accuracy 0.930"),
        (_inputs(drift_alarm=True, drift_score=0.5, estimated=0.8), True, "with estimated"),
        (_inputs(drift_alarm=True, drift_score=0.5, estimated=0.94), False, "reported only"),
        (_inputs(estimated=0.7), False, "no drift alarm"),
        (_inputs(new_labels=500, last_retrain_at=940.0), False, "cooldown"),
        (_inputs(new_labels=500, retrain_running=True), False, "already in progress"),
    ],
)
def test_each_trigger_cause_and_each_non_decision_says_why(inputs, go, why):
    decision, reasons = should_retrain(inputs, CFG)
    assert decision is go and any(why in r for r in reasons), reasons


def test_drift_alone_retrains_only_when_configured_and_the_floor_counts():
    alarm = _inputs(drift_alarm=True, drift_score=0.6)
    assert should_retrain(alarm, CFG)[0] is False
    assert should_retrain(alarm, CFG.model_copy(update={"drift_retrains": True}))[0] is True
    floored = CFG.model_copy(update={"accuracy_floor": 0.97})  # above test accuracy - drop
    assert should_retrain(_inputs(realized=0.95), floored)[0] is True


def test_the_drift_check_skips_a_new_deployment_before_loading_anything(settings, params):
    """Too few logged rows skip the check before the processed data and the champion are
    loaded: a new deployment has neither, and the scheduled monitor failed on it."""
    from pipeline.monitor import check_drift, new_labels
    from pipeline.store import PredictionStore

    assert not settings.processed_dir.exists()
    assert not (settings.root / "predictions.db").exists()  # no tables either
    assert check_drift(settings, params, 0.0) == {"skipped": "only 0 logged rows"}
    assert new_labels(settings) == 0
    PredictionStore(settings.prediction_db).create().dispose()
    assert check_drift(settings, params, 0.0) == {"skipped": "only 0 logged rows"}
