"""Evaluation on the held-out test split: metrics, plots, and k-fold cross-validation."""

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


def cross_validate(frame, params: dict, k: int = 5, device: str = "cpu") -> dict:
    """Stratified k-fold CV of the whole preprocess+train path: mean and spread of accuracy."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from pipeline.model import Predictor
    from pipeline.preprocess import Preprocessor, features_labels
    from pipeline.train import SplitData, TrainParams, train_model
    from pipeline.validate import LABEL, Schema

    if k < 2:
        raise ValueError("k-fold cross-validation needs k >= 2")
    schema = Schema(tuple(c for c in frame.columns if c != LABEL), params["data"]["num_classes"])
    tp = TrainParams.from_params(params)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=params["seed"])
    scores = []
    for fold, (rest, test) in enumerate(folds.split(frame, frame[LABEL]), start=1):
        train, val = train_test_split(
            rest,
            test_size=params["split"]["val_size"],
            stratify=frame[LABEL].iloc[rest],
            random_state=params["seed"],
        )
        parts = {"train": frame.iloc[train], "val": frame.iloc[val], "test": frame.iloc[test]}
        pre = Preprocessor.fit(features_labels(parts["train"], schema)[0], schema)
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
