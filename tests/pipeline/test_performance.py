"""Performance under label delay: coverage, latency and maturity on hand-made label
timings; the confidence-based estimate against realized accuracy on the demo stream, plain
and shifted, with a model really trained and calibrated."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MonitorParams
from pipeline.performance import Calibration, windows


def _row(version, t, label, truth=None, labelled_after=None, conf=0.9):
    probs = np.full(10, (1 - conf) / 9, np.float32)
    probs[label] = conf
    at = None if labelled_after is None else t + labelled_after
    return (version, t, at, label, truth, probs)


CFG = MonitorParams(perf_window_s=100, min_coverage=0.5, label_delay_s=1000, min_labels=3)


def test_coverage_latency_and_maturity_per_version_and_window():
    rows = [_row("1", float(t), 1) for t in range(0, 100, 10)]  # window 0: 10 rows of v1
    for k, after in zip((0, 1, 2, 3), (5, 10, 20, 40), strict=True):  # 4 labelled, 3 right
        rows[k] = _row("1", float(k * 10), 1, truth=1 if k < 3 else 2, labelled_after=after)
    rows += [_row("1", 100.0 + t, 1, truth=1, labelled_after=1) for t in range(6)]  # window 1
    rows += [_row("1", 106.0 + t, 1) for t in range(4)]
    rows += [_row("2", 150.0, 4, truth=4, labelled_after=2)]  # one row of v2 in window 1

    early = {(w.version, w.start): w for w in windows(rows, CFG, now=250.0, calibrations={})}
    w0, w1, v2 = early[("1", 0)], early[("1", 100)], early[("2", 100)]
    assert (w0.rows, w0.labelled, w0.coverage) == (10, 4, 0.4)
    assert w0.latency_p50_s == pytest.approx(15.0) and w0.latency_p90_s == pytest.approx(34.0)
    assert not w0.mature and w0.realized is None and w0.status == "immature"
    assert w1.coverage == 0.6 and w1.mature and w1.realized == 1.0  # mature by coverage
    assert v2.rows == 1 and v2.mature and v2.realized is None  # 1 label < min_labels
    assert v2.status == "too few labels"

    late = {(w.version, w.start): w for w in windows(rows, CFG, now=1200.0, calibrations={})}
    assert late[("1", 0)].mature and late[("1", 0)].realized == pytest.approx(0.75)  # by age


def test_the_threshold_estimates_accuracy_where_confidence_and_correctness_hold():
    """Rows right with a chance that grows with their confidence: the threshold fitted on
    one sample estimates another's accuracy, also when the other is less confident."""
    rng = np.random.default_rng(0)

    def sample(n, low):
        conf = rng.uniform(low, 1.0, n)
        right = rng.uniform(size=n) < conf**3
        probs = np.stack([conf, 1 - conf], axis=1)
        return probs, np.where(right, 0, 1), right.mean()

    probs, y, _ = sample(4000, 0.5)
    cal = Calibration.fit(probs, y)
    assert cal.accuracy == pytest.approx((probs.argmax(1) == y).mean())
    for low in (0.5, 0.3):  # the same population, then a shifted, less confident one
        target, _, realized = sample(3000, low)
        est, lo, hi = cal.estimate(target)
        assert lo < realized < hi and abs(est - realized) < 0.03, (low, est, realized)


def test_saturated_confidences_count_in_part_at_the_threshold():
    probs = np.array([[1.0, 0.0]] * 8 + [[0.6, 0.4]] * 2)
    y = np.array([0] * 6 + [1] * 2 + [1] * 2)  # 6 of 10 right; the eight 1.0s tie
    cal = Calibration.fit(probs, y)
    assert cal.threshold == 1.0 and cal.at_weight == pytest.approx(0.75)
    assert cal.estimate(probs)[0] == pytest.approx(0.6)  # 8 x 0.75: the ties share the count


@pytest.mark.slow
def test_the_estimate_tracks_realized_accuracy_on_the_demo_stream(prepared, settings, params):
    """Plain and shifted stream (images moved a quarter of their side), windows of ~195
    rows: the estimate's interval holds the realized accuracy; on the plain stream it is
    narrow, on the shifted one the estimate sees most of the drop without a label, flags its
    own assumption as strained, and its interval is wider by as much."""
    from pipeline.experiment import fit
    from pipeline.ingest import load_digits_frame
    from pipeline.registry import load_predictor
    from pipeline.stream import distort

    cand = fit(settings, params, epochs=6, show_progress=False)
    predictor, _ = load_predictor(settings.model_name, cand.version)
    calibration = predictor.calibration
    assert calibration is not None  # saved with the model, back from the registry
    stream = load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
    x = stream.drop(columns="label").to_numpy(np.float32)
    y = stream["label"].to_numpy()

    def per_window(probs):
        inside, spans, widths = 0, [], []
        chunks = np.array_split(np.arange(len(y)), 6)
        for idx in chunks:
            _, low, high = calibration.estimate(probs[idx])
            realized = float((probs[idx].argmax(1) == y[idx]).mean())
            inside += low <= realized <= high
            spans.append((round(realized, 3), round(low, 3), round(high, 3)))
            widths.append(high - low)
        # a 95% interval: at most one window outside
        assert inside >= len(chunks) - 1, spans
        return float(np.mean(widths))

    probs = predictor.predict_proba(x)
    plain_width = per_window(probs)
    est, low, high = calibration.estimate(probs)
    realized_all = float((probs.argmax(1) == y).mean())
    assert low <= realized_all <= high, (realized_all, low, high)
    assert plain_width < 0.35  # sampling on ~195 rows and ~95 validation rows, no more
    assert calibration.shift(probs.max(1)) == 0.0  # like the validation split

    shifted = predictor.predict_proba(distort(x, predictor.preprocessor.schema))
    shifted_width = per_window(shifted)
    realized_shifted = float((shifted.argmax(1) == y).mean())
    est_shifted, low, high = calibration.estimate(shifted)
    assert low <= realized_shifted <= high, (realized_shifted, low, high)
    drop_seen = calibration.accuracy - est_shifted
    drop_real = calibration.accuracy - realized_shifted
    assert drop_real > 0.2 and drop_seen > 0.5 * drop_real, (est_shifted, realized_shifted)
    assert calibration.shift(shifted.max(1)) > 0.1  # it says so
    assert shifted_width > plain_width + 0.1  # and the interval says it is less sure
