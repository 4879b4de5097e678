"""The promotion gate: a new version becomes champion only when it beats the champion.

Both are scored on the same current test split (raw features, each model applying its own
preprocessor), so a round compares like with like; the decision and its reason go to the
ledger either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline import ledger
from pipeline.config import Params, Settings
from pipeline.model import Predictor
from pipeline.preprocess import load_preprocessor, raw_test_set
from pipeline.registry import (
    CHALLENGER,
    CHAMPION,
    champion_lock,
    current_champion,
    load_predictor,
    set_alias,
)

log = logging.getLogger(__name__)


@dataclass
class Decision:
    promoted: bool
    candidate: str
    champion: str | None
    candidate_score: float
    champion_score: float | None
    reason: str


def score(predictor: Predictor, x: np.ndarray, y: np.ndarray) -> float:
    return float((predictor.predict(x) == y).mean())


def promote_if_better(
    settings: Settings, candidate: str, x_test: np.ndarray, y_test: np.ndarray, margin: float
) -> Decision:
    """Promote `candidate` when its accuracy beats the champion's by more than `margin`."""
    name = settings.model_name
    cand_pred, _ = load_predictor(name, candidate)
    cand_score = score(cand_pred, x_test, y_test)
    with champion_lock(settings):  # decided and applied on the champion as it is now
        champion = current_champion(settings)
        decision = _decide(settings, candidate, cand_score, champion, x_test, y_test, margin)
        if decision.reason != "already champion":
            _apply(settings, decision)
    return decision


def _decide(settings, candidate, cand_score, champion, x_test, y_test, margin) -> Decision:
    name = settings.model_name
    if champion is None:
        decision = Decision(True, candidate, None, cand_score, None, "first version")
    elif champion == candidate:
        decision = Decision(False, candidate, champion, cand_score, cand_score, "already champion")
    else:
        champ_pred, _ = load_predictor(name, champion)
        champ_score = score(champ_pred, x_test, y_test)
        better = cand_score > champ_score + margin
        reason = (
            f"v{candidate} accuracy {cand_score:.4f} vs champion v{champion} {champ_score:.4f} "
            f"({'beats' if better else 'does not beat'} it by more than {margin})"
        )
        decision = Decision(better, candidate, champion, cand_score, champ_score, reason)
    return decision


def promote_on_test_split(settings: Settings, params: Params, candidate: str) -> Decision:
    """The gate on the project's current test split, with params.yaml's margin."""
    x, y = raw_test_set(settings.processed_dir, load_preprocessor(settings.processed_dir).schema)
    return promote_if_better(settings, candidate, x, y, params.promote.margin)


def _apply(settings: Settings, d: Decision) -> None:
    name = settings.model_name
    if d.promoted:
        set_alias(name, CHAMPION, d.candidate)
        if d.champion:
            set_alias(name, CHALLENGER, d.champion)
    else:
        set_alias(name, CHALLENGER, d.candidate)
    action = "promote" if d.promoted else "reject"
    ledger.record(
        settings,
        action,
        d.champion,
        d.candidate if d.promoted else d.champion,
        d.reason,
        {"candidate_accuracy": d.candidate_score, "champion_accuracy": d.champion_score},
        candidate=d.candidate,
    )
    log.info("%s v%s: %s", action, d.candidate, d.reason)
