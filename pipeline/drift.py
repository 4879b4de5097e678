"""Input drift: the logged production inputs against the training reference.

Per-feature two-sample Kolmogorov-Smirnov tests (scipy), the shift of the predicted-class
distribution (population stability index), and the drop in mean confidence. The score is
the share of (non-constant) features whose distribution changed significantly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import MonitorParams

log = logging.getLogger(__name__)

MIN_ROWS = 20  # fewer logged rows say nothing about a distribution


@dataclass
class DriftReport:
    n_reference: int
    n_current: int
    score: float  # share of features drifted (p < alpha, Bonferroni-free, per feature)
    drifted_features: list[str] = field(default_factory=list)
    class_psi: float = 0.0
    confidence_reference: float = 0.0
    confidence_current: float = 0.0
    drifted: bool = False
    out_of_range_share: float = 0.0  # logged rows unlike the training data (preprocess.py)

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


def detect_drift(
    reference: np.ndarray,
    current: np.ndarray,
    names: list[str],
    ref_probs: np.ndarray,
    cur_probs: np.ndarray,
    threshold: float,
    alpha: float = 0.01,
) -> DriftReport:
    """(n, F) reference and current inputs, and the model's probabilities on each."""
    from scipy.stats import ks_2samp

    if len(current) < MIN_ROWS:
        raise ValueError(
            f"need at least {MIN_ROWS} logged rows to judge drift, have {len(current)}"
        )
    varying = np.flatnonzero(reference.std(axis=0) > 0)
    drifted = []
    for j in varying:
        if ks_2samp(reference[:, j], current[:, j]).pvalue < alpha:
            drifted.append(names[j])
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


def should_retrain(
    new_labels: int,
    drift_score: float | None,
    last_retrain_at: float | None,
    now: float,
    retrain_running: bool,
    cfg: MonitorParams,
) -> tuple[bool, str]:
    """The monitor's decision: enough new labels or drift, outside the cooldown, no overlap."""
    if retrain_running:
        return False, "a retraining run is already in progress"
    if last_retrain_at is not None and now - last_retrain_at < cfg.cooldown_s:
        left = cfg.cooldown_s - (now - last_retrain_at)
        return False, f"cooldown: {left:.0f} s left"
    if new_labels >= cfg.min_new_labels:
        return True, f"{new_labels} new labels (threshold {cfg.min_new_labels})"
    if drift_score is not None and drift_score >= cfg.drift_threshold:
        return True, f"drift score {drift_score:.2f} >= {cfg.drift_threshold}"
    shown = "n/a" if drift_score is None else f"{drift_score:.2f}"
    return False, f"{new_labels} new labels, drift {shown}: below both thresholds"
