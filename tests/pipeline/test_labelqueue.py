"""The label queue's ordering for each strategy, on hand-made probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.labelqueue import rank


def _rows():
    probs = {
        "sure": [0.98, 0.01, 0.01],
        "two-way": [0.49, 0.48, 0.03],  # the smallest margin
        "spread": [0.36, 0.32, 0.32],  # the highest entropy
        "lean": [0.70, 0.20, 0.10],
    }
    shadow = {"sure": 1, "lean": 0}  # the shadow disagrees on "sure", agrees on "lean"
    return [
        {"id": k, "probabilities": np.array(p, np.float32), "label": int(np.argmax(p)),
         "shadow_label": shadow.get(k)}
        for k, p in probs.items()
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "first"),
    [
        ("uncertainty", ["spread", "two-way", "lean", "sure"]),
        ("margin", ["two-way", "spread", "lean", "sure"]),
        ("disagreement", ["sure", "two-way", "spread", "lean"]),
    ],
)
def test_each_strategy_orders_the_rows_it_should(strategy, first):
    assert [r["id"] for r in rank(_rows(), strategy, 4)] == first


def test_budget_random_seed_and_unknown_strategy():
    rows = _rows() * 2  # the same ids twice (two shadows): each counted once
    assert len(rank(rows, "uncertainty", 10)) == 4
    assert len(rank(rows, "margin", 2)) == 2
    a, b = rank(rows, "random", 3, seed=1), rank(rows, "random", 3, seed=1)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    with pytest.raises(ValueError, match="unknown strategy"):
        rank(rows, "vibes", 2)


@pytest.mark.parametrize("strategy", ["uncertainty", "margin", "disagreement", "random"])
def test_rows_of_models_with_different_class_counts_are_ranked_together(strategy):
    """The log holds predictions of a 10-class and a 3-class model after the classes
    changed: each row is scored by its own distribution (the queue used to fail with
    "all input arrays must have the same shape"). Uncertainty is on one scale: a uniform
    3-class row (entropy log 3 = 1.10, all of its maximum) ranks before a 10-class row
    of entropy 1.5 (65% of log 10), which ranks before a sure 3-class row."""
    wide = np.full(10, 0.02, np.float32)
    wide[:3] = [0.52, 0.2, 0.14]
    rows = [
        {"id": "wide", "probabilities": wide, "label": 0},
        {"id": "even", "probabilities": np.full(3, 1 / 3, np.float32), "label": 0},
        {"id": "sure", "probabilities": np.array([0.98, 0.01, 0.01], np.float32), "label": 0},
    ]
    order = [r["id"] for r in rank(rows, strategy, 3)]
    assert sorted(order) == ["even", "sure", "wide"]
    if strategy == "uncertainty":
        assert order == ["even", "wide", "sure"]
    if strategy == "margin":  # margins 0, 0.3 and 0.97
        assert order == ["even", "wide", "sure"]
