"""Evaluation: metrics of predicted probabilities against labels, and the plots of a run.

No data loading and no training here (k-fold cross-validation is an experiment:
pipeline/experiment.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro F1, log loss and a per-class report: (n,) labels vs (n, C) probs."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score, log_loss

    y_pred = probs.argmax(axis=1)
    labels = list(range(num_classes))
    report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "log_loss": float(log_loss(y_true, np.clip(probs, 1e-7, 1), labels=labels)),
        "per_class": {
            str(c): {
                k: float(report[str(c)][k]) for k in ("precision", "recall", "f1-score", "support")
            }
            for c in labels
        },
        "n": int(len(y_true)),
    }


def confusion_matrix_png(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    fig, ax = plt.subplots(figsize=(6, 6))
    ConfusionMatrixDisplay(matrix).plot(ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (test split)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curve_png(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
