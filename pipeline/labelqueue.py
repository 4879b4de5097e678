"""What to label next (active learning): the logged predictions whose labels would teach the
model most, for a labelling budget.

Strategies, each over the unlabelled rows of the prediction log:
- uncertainty: highest entropy of the predicted distribution first, as a share of its
  maximum (the log of the class count), so rows of models with different class counts
  (the classes changed between data versions) are ranked on one scale;
- margin: smallest gap between the two most likely classes first;
- disagreement: rows where the shadow version (serving/shadow.py) said something else than
  the champion first, then by margin;
- random: a seeded random sample (the baseline the others must beat; bench/labels.py).
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("uncertainty", "margin", "disagreement", "random")


def scores(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Higher first. `probs`: (n, classes)."""
    if strategy == "uncertainty":
        p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
        return -(p * np.log(p)).sum(axis=1) / np.log(max(probs.shape[1], 2))
    if strategy in ("margin", "disagreement"):
        top2 = np.sort(probs, axis=1)[:, -2:]
        return -(top2[:, 1] - top2[:, 0])  # a small margin scores high
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def rank(rows: list[dict], strategy: str, budget: int, seed: int = 0) -> list[dict]:
    """The `budget` rows (dicts with id, probabilities, label, optional shadow_label) to
    label first, each with the score it was ranked by."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    unique = list({r["id"]: r for r in rows}.values())  # a row scored by two shadows: once
    if not unique or budget <= 0:
        return []
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(unique))[:budget]
        return [{**unique[k], "score": 0.0} for k in order]
    # rows of models with different class counts (the classes changed between data
    # versions) are scored each by its own distribution, a group per width
    score = np.empty(len(unique), np.float64)
    by_width: dict[int, list[int]] = {}
    for k, r in enumerate(unique):
        by_width.setdefault(len(r["probabilities"]), []).append(k)
    for members in by_width.values():
        probs = np.stack([np.asarray(unique[k]["probabilities"], np.float32) for k in members])
        score[members] = scores(probs, strategy)
    if strategy == "disagreement":
        disagree = np.array(
            [r.get("shadow_label") is not None and r["shadow_label"] != r["label"] for r in unique]
        )
        score = score + 10.0 * disagree  # every disagreement before any agreement
    order = np.argsort(-score, kind="stable")[:budget]
    return [{**unique[k], "score": float(score[k])} for k in order]
