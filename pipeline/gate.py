"""The promotion gate: a new version becomes champion only when it beats the champion.

Both are scored on the same rows (raw features, each model applying its own preprocessor),
so a round compares like with like; the decision, the test behind it and its figures go to
the ledger either way. Two rules (params.yaml `promote.test`):

- paired (default): the fixed test split plus, when there are any, the labelled rows that the
  challenger scored in shadow beside the champion (`serving.shadow`). An exact one-sided
  McNemar test on the rows only one of the two got right, a paired bootstrap interval of
  the accuracy difference, a minimum effect, and per-class non-regression (no class's
  recall may drop by more than `max_class_drop`).
- margin: test accuracy higher than the champion's by more than `margin`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline import ledger
from pipeline.config import Params, PromoteParams, Settings
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
    test: str = "margin"
    figures: dict = field(default_factory=dict)  # the numbers behind it, as ledger metrics


@dataclass(frozen=True)
class Paired:
    """Challenger and champion on the same labelled rows."""

    n: int
    candidate_accuracy: float
    champion_accuracy: float
    candidate_only: int  # rows only the challenger got right
    champion_only: int  # rows only the champion got right
    p_value: float  # exact one-sided McNemar: is the challenger better?
    ci_low: float  # 95% paired bootstrap interval of the accuracy difference
    ci_high: float
    class_deltas: dict[int, float]  # recall of the challenger minus the champion's, per class

    @property
    def difference(self) -> float:
        return self.candidate_accuracy - self.champion_accuracy

    def figures(self) -> dict[str, float]:
        out = {
            "paired_rows": float(self.n),
            "accuracy_difference": self.difference,
            "p_value": self.p_value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "candidate_only_right": float(self.candidate_only),
            "champion_only_right": float(self.champion_only),
        }
        out.update({f"class_{k}_recall_delta": d for k, d in self.class_deltas.items()})
        return out


def compare(
    y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, resamples: int = 4000, seed=0
) -> Paired:
    """The paired comparison of two label vectors against the truth `y`."""
    from scipy.stats import binomtest

    y, candidate, champion = (np.asarray(a).astype(np.int64) for a in (y, candidate, champion))
    if not len(y) == len(candidate) == len(champion) or len(y) == 0:
        raise ValueError("the paired comparison needs the same, non-empty set of rows")
    right_c, right_h = candidate == y, champion == y
    b, c, n = int((right_c & ~right_h).sum()), int((~right_c & right_h).sum()), len(y)
    p_value = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    # The bootstrap of the per-row difference (+1 on b rows, -1 on c rows, 0 elsewhere)
    # draws only how many rows of each kind a resample holds: a multinomial, not n indices.
    draws = np.random.default_rng(seed).multinomial(n, [b / n, c / n, (n - b - c) / n], resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    low, high = np.quantile(diffs, [0.025, 0.975])
    deltas = {int(k): float(right_c[y == k].mean() - right_h[y == k].mean()) for k in np.unique(y)}
    return Paired(
        n, float(right_c.mean()), float(right_h.mean()), b, c, float(p_value),
        float(low), float(high), deltas,
    )  # fmt: skip


def judge(cmp: Paired, rule: PromoteParams) -> tuple[bool, str]:
    """Whether the challenger passes the paired rule, and why (every failed condition)."""
    failed = []
    if cmp.p_value >= rule.alpha:
        failed.append(f"not significant (p={cmp.p_value:.3g} >= {rule.alpha})")
    if cmp.difference <= 0 or cmp.difference < rule.min_effect:
        failed.append(f"gain {cmp.difference:+.4f} below the minimum effect {rule.min_effect}")
    worst = {k: d for k, d in cmp.class_deltas.items() if d < -rule.max_class_drop}
    if worst:
        listed = ", ".join(f"class {k} {d:+.3f}" for k, d in sorted(worst.items()))
        failed.append(f"recall drops more than {rule.max_class_drop} on {listed}")
    summary = (
        f"accuracy {cmp.candidate_accuracy:.4f} vs {cmp.champion_accuracy:.4f} on {cmp.n} "
        f"paired rows (difference {cmp.difference:+.4f}, 95% CI [{cmp.ci_low:+.4f}, "
        f"{cmp.ci_high:+.4f}], McNemar p={cmp.p_value:.3g}, {cmp.candidate_only} rows only "
        f"it got right, {cmp.champion_only} only the champion)"
    )
    if failed:
        return False, f"{summary}: {'; '.join(failed)}"
    return True, f"{summary}: significant, large enough, no class regressed"


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


def promote_paired(
    settings: Settings,
    candidate: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
    rule: PromoteParams,
    canary: bool = False,
) -> Decision:
    """Promote `candidate` when it passes the paired rule (`judge`) on the test split plus,
    with `rule.shadow_labels`, the labelled rows it scored in shadow beside the champion.

    With `canary`, a candidate that passes is not promoted here: a canary rollout follows
    (pipeline/rollout.py, whose start entry in the ledger carries this decision's figures);
    a refusal is applied and recorded as always."""
    name = settings.model_name
    cand_pred, _ = load_predictor(name, candidate)
    cand_labels = cand_pred.predict(x_test)
    cand_score = float((cand_labels == y_test).mean())
    with champion_lock(settings):
        champion = current_champion(settings)
        if champion is None:
            decision = Decision(True, candidate, None, cand_score, None, "first version", "paired")
        elif champion == candidate:
            return Decision(False, candidate, champion, cand_score, cand_score, "already champion")
        else:
            champ_pred, _ = load_predictor(name, champion)
            y, cand, champ = y_test, cand_labels, champ_pred.predict(x_test)
            shadow = shadow_rows(settings, candidate, champion) if rule.shadow_labels else None
            if shadow is not None and len(shadow[0]):
                y, cand, champ = (
                    np.concatenate([a, b]) for a, b in zip((y, cand, champ), shadow, strict=True)
                )
            cmp = compare(y, cand, champ)
            passed, why = judge(cmp, rule)
            shadow_n = 0 if shadow is None else len(shadow[0])
            reason = (
                f"v{candidate} vs champion v{champion}, paired test on {len(y_test)} test rows"
                + (f" + {shadow_n} labelled shadow rows" if shadow_n else "")
                + f": {why}"
            )
            figures = {**cmp.figures(), "shadow_rows": float(shadow_n)}
            champ_score = float((champ[: len(y_test)] == y_test).mean())
            decision = Decision(
                passed, candidate, champion, cand_score, champ_score, reason, "paired", figures
            )
        if not (canary and decision.promoted and decision.champion is not None):
            _apply(settings, decision)
    return decision


def shadow_rows(
    settings: Settings, candidate: str, champion: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, challenger's labels, champion's labels) of the labelled rows that the
    champion answered and the challenger scored in shadow."""
    from pipeline.store import PredictionStore

    store = PredictionStore(settings.prediction_db).create()
    try:
        return store.shadow_pairs(settings.model_name, candidate, champion)
    finally:
        store.dispose()


def promote_on_test_split(
    settings: Settings, params: Params, candidate: str, canary: bool = False
) -> Decision:
    """The gate on the project's current test split, with params.yaml's rule (`canary`: see
    `promote_paired`; the margin rule has no canary mode)."""
    x, y = raw_test_set(settings.processed_dir, load_preprocessor(settings.processed_dir).schema)
    if params.promote.test == "paired":
        return promote_paired(settings, candidate, x, y, params.promote, canary)
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
        {
            "candidate_accuracy": d.candidate_score,
            "champion_accuracy": d.champion_score,
            **d.figures,
        },
        candidate=d.candidate,
        test=d.test,
    )
    log.info("%s v%s: %s", action, d.candidate, d.reason)
