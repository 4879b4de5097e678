"""Input drift: the logged production inputs against the training reference, without the
false alarms that large samples bring.

Per feature, the test fits the feature: a discrete one (at most `DISCRETE_LEVELS` integer
values, the digits' 0..16 pixels) gets a chi-square test of its category counts, with
categories too rare for the test's expected counts pooled; a continuous one, or a discrete
one whose counts are too thin, the two-sample Kolmogorov-Smirnov test. The p-values of all
features are corrected together (Benjamini-Hochberg at `false_alarm_rate`), and a feature
counts as drifted only when its change is also large enough to matter: its effect size
(the largest gap between the two CDFs, in [0, 1], for either kind) at least `min_effect`.
With thousands of rows every tiny difference becomes significant; the effect size is what
keeps a large window of practically unchanged data quiet. A window is drifted when the
share of drifted features reaches the threshold; the monitor raises an alarm only after
`persistence` drifted windows in a row (pipeline/monitor.py). Reports carry the effect
sizes, not only p-values, plus the shift of the predicted classes (PSI) and of confidence.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import MonitorParams

log = logging.getLogger(__name__)

MIN_ROWS = 20  # fewer logged rows say nothing about a distribution
DISCRETE_LEVELS = 20  # integer features with at most this many values are categorical
MIN_EXPECTED = 5  # the chi-square test's usual bound on expected counts per category


@dataclass
class DriftReport:
    n_reference: int
    n_current: int
    score: float  # share of (non-constant) features drifted: significant and large enough
    drifted_features: list[str] = field(default_factory=list)
    class_psi: float = 0.0
    confidence_reference: float = 0.0
    confidence_current: float = 0.0
    drifted: bool = False  # this window: score >= threshold
    out_of_range_share: float = 0.0  # logged rows unlike the training data (preprocess.py)
    effects: dict[str, float] = field(default_factory=dict)  # the largest effect sizes
    tests: dict[str, int] = field(default_factory=dict)  # how many features got which test
    alarm: bool = False  # drifted in `persistence` windows in a row (set by the monitor)

    @property
    def confidence_drop(self) -> float:
        return self.confidence_reference - self.confidence_current

    def to_dict(self) -> dict:
        return {**asdict(self), "confidence_drop": self.confidence_drop}


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two discrete distributions (counts or shares)."""
    e = np.clip(expected / max(expected.sum(), 1), eps, None)
    a = np.clip(actual / max(actual.sum(), 1), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_test(reference: np.ndarray, current: np.ndarray) -> tuple[str, float, float]:
    """(test name, p-value, effect size) of one feature's change."""
    from scipy.stats import chi2_contingency, ks_2samp

    levels = np.union1d(np.unique(reference), np.unique(current))
    if len(levels) <= DISCRETE_LEVELS and np.all(levels == np.round(levels)):
        ref = np.searchsorted(levels, reference)
        cur = np.searchsorted(levels, current)
        counts = np.stack(
            [np.bincount(ref, minlength=len(levels)), np.bincount(cur, minlength=len(levels))]
        ).astype(float)
        shares = counts / counts.sum(axis=1, keepdims=True)
        # the values are numbers, so ordered: the largest gap of the two CDFs (the KS
        # distance, comparable with the continuous features'); total variation would add
        # up the sampling noise of every one of up to 20 categories
        effect = float(np.abs(np.cumsum(shares[0]) - np.cumsum(shares[1])).max())
        # pool the categories too rare for the test into one
        share = counts.sum(axis=0) / counts.sum()
        expected_small = np.outer(counts.sum(axis=1), share).min(axis=0) < MIN_EXPECTED
        if expected_small.any():
            pooled = counts[:, expected_small].sum(axis=1, keepdims=True)
            counts = np.concatenate([counts[:, ~expected_small], pooled], axis=1)
        counts = counts[:, counts.sum(axis=0) > 0]
        expected = np.outer(counts.sum(axis=1), counts.sum(axis=0) / counts.sum())
        if counts.shape[1] >= 2 and expected.min() >= MIN_EXPECTED:
            return "chi2", float(chi2_contingency(counts, correction=False).pvalue), effect
        result = ks_2samp(reference, current)
        return "ks", float(result.pvalue), effect
    result = ks_2samp(reference, current)
    return "ks", float(result.pvalue), float(result.statistic)


def benjamini_hochberg(p_values: np.ndarray, q: float) -> np.ndarray:
    """Which hypotheses the Benjamini-Hochberg procedure rejects at false discovery rate q."""
    m = len(p_values)
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p_values)
    below = p_values[order] <= q * np.arange(1, m + 1) / m
    rejected = np.zeros(m, dtype=bool)
    if below.any():
        rejected[order[: int(np.flatnonzero(below).max()) + 1]] = True
    return rejected


def detect_drift(
    reference: np.ndarray,
    current: np.ndarray,
    names: list[str],
    ref_probs: np.ndarray,
    cur_probs: np.ndarray,
    threshold: float,
    false_alarm_rate: float = 0.05,
    min_effect: float = 0.1,
) -> DriftReport:
    """(n, F) reference and current inputs, and the model's probabilities on each."""
    if len(current) < MIN_ROWS:
        raise ValueError(
            f"need at least {MIN_ROWS} logged rows to judge drift, have {len(current)}"
        )
    varying = np.flatnonzero(reference.std(axis=0) > 0)
    results = [feature_test(reference[:, j], current[:, j]) for j in varying]
    p_values = np.array([r[1] for r in results])
    effects = np.array([r[2] for r in results])
    significant = benjamini_hochberg(p_values, false_alarm_rate)
    drifted = [names[j] for j, s, e in zip(varying, significant, effects, strict=True)
               if s and e >= min_effect]  # fmt: skip
    tests: dict[str, int] = {}
    for name, _, _ in results:
        tests[name] = tests.get(name, 0) + 1
    top = np.argsort(effects)[::-1][:10]
    classes = ref_probs.shape[1]
    report = DriftReport(
        n_reference=len(reference),
        n_current=len(current),
        score=len(drifted) / max(len(varying), 1),
        drifted_features=drifted,
        class_psi=psi(
            np.bincount(ref_probs.argmax(1), minlength=classes).astype(float),
            np.bincount(cur_probs.argmax(1), minlength=classes).astype(float),
        ),
        confidence_reference=float(ref_probs.max(1).mean()),
        confidence_current=float(cur_probs.max(1).mean()),
        effects={names[varying[k]]: round(float(effects[k]), 4) for k in top},
        tests=tests,
    )
    report.drifted = report.score >= threshold
    return report


def drift_plot(report: DriftReport, reference: np.ndarray, current: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(reference.mean(0), label="reference mean")
    axes[0].plot(current.mean(0), label="production mean")
    axes[0].set_xlabel("feature")
    axes[0].legend()
    axes[0].set_title(f"drift score {report.score:.2f} ({len(report.drifted_features)} features)")
    axes[1].bar(
        ["reference", "production"], [report.confidence_reference, report.confidence_current]
    )
    axes[1].set_title(f"mean confidence; class PSI {report.class_psi:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


@dataclass
class TriggerInputs:
    """What the monitor knows when it decides."""

    new_labels: int  # labelled predictions not yet pulled into the data
    drift_score: float | None  # the latest window's share of drifted features
    drift_alarm: bool  # drifted in `persistence` windows in a row
    realized: float | None  # the champion's latest mature window's realized accuracy
    estimated: float | None  # the champion's latest window's estimated accuracy
    champion_test_accuracy: float | None
    last_retrain_at: float | None
    now: float
    retrain_running: bool


def should_retrain(x: TriggerInputs, cfg: MonitorParams) -> tuple[bool, list[str]]:
    """The monitor's decision and every reason behind it (a non-decision says why not).

    Retrains on: enough new labels; a realized accuracy (mature window) below the floor or
    `max_accuracy_drop` below the champion's test accuracy; an estimated accuracy that low
    while drift persists; persistent drift alone only with `drift_retrains`. Never inside
    the cooldown or while a retraining run is in progress."""
    if x.retrain_running:
        return False, ["a retraining run is already in progress"]
    if x.last_retrain_at is not None and x.now - x.last_retrain_at < cfg.cooldown_s:
        return False, [f"cooldown: {cfg.cooldown_s - (x.now - x.last_retrain_at):.0f} s left"]
    limit = None
    if x.champion_test_accuracy is not None:
        limit = x.champion_test_accuracy - cfg.max_accuracy_drop
    if cfg.accuracy_floor is not None:
        limit = cfg.accuracy_floor if limit is None else max(limit, cfg.accuracy_floor)
    go, reasons = False, []
    if x.new_labels >= cfg.min_new_labels:
        go = True
        reasons.append(f"{x.new_labels} new labels (threshold {cfg.min_new_labels})")
    else:
        reasons.append(f"{x.new_labels} new labels, below {cfg.min_new_labels}")
    if x.realized is not None and limit is not None and x.realized < limit:
        go = True
        reasons.append(f"realized accuracy {x.realized:.3f} below {limit:.3f}")
    elif x.realized is not None:
        reasons.append(f"realized accuracy {x.realized:.3f}")
    low_estimate = x.estimated is not None and limit is not None and x.estimated < limit
    drift = "n/a" if x.drift_score is None else f"{x.drift_score:.2f}"
    if x.drift_alarm and low_estimate:
        go = True
        reasons.append(
            f"persistent drift (score {drift}) with estimated accuracy {x.estimated:.3f} "
            f"below {limit:.3f}"
        )
    elif x.drift_alarm and cfg.drift_retrains:
        go = True
        reasons.append(f"persistent drift (score {drift}); drift_retrains is on")
    elif x.drift_alarm:
        reasons.append(f"persistent drift (score {drift}), reported only: estimate holds")
    elif low_estimate:
        reasons.append(f"estimated accuracy {x.estimated:.3f} below {limit:.3f}, no drift alarm")
    else:
        reasons.append(f"drift {drift}, no alarm")
    return go, reasons
