"""The statistical promotion gate: the paired comparison on hand-made label vectors (where
the right answer is known), and the whole gate on real models in a real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.config import Params, PromoteParams
from pipeline.experiment import fit
from pipeline.gate import compare, judge, promote_if_better, promote_paired
from pipeline.ledger import entries as ledger
from pipeline.preprocess import load_preprocessor, raw_test_set
from pipeline.registry import CHAMPION, alias_version


def _vectors(n: int, both: int, only_cand: int, only_champ: int, classes: int = 10):
    """Truth and two label vectors with exactly the given agreement pattern."""
    y = np.arange(n) % classes
    cand, champ = y.copy(), y.copy()
    wrong = (y + 1) % classes
    k = 0
    for count, who in ((n - both - only_cand - only_champ, "none"), (only_cand, "cand")):
        if who == "none":
            cand[k : k + count], champ[k : k + count] = wrong[k : k + count], wrong[k : k + count]
        else:
            champ[k : k + count] = wrong[k : k + count]
        k += count
    champ_only = slice(k, k + only_champ)
    cand[champ_only] = wrong[champ_only]
    return y, cand, champ


def test_the_comparison_counts_discordant_rows_and_matches_the_exact_test():
    y, cand, champ = _vectors(1000, both=900, only_cand=40, only_champ=15)
    cmp = compare(y, cand, champ)
    assert (cmp.candidate_only, cmp.champion_only, cmp.n) == (40, 15, 1000)
    assert cmp.difference == pytest.approx(0.025)
    assert cmp.p_value == pytest.approx(binomtest(40, 55, 0.5, alternative="greater").pvalue)
    assert cmp.ci_low < cmp.difference < cmp.ci_high
    assert cmp.ci_low > 0  # 40 against 15 on the same rows: clearly better
    assert set(cmp.class_deltas) == set(range(10))
    assert sum(cmp.class_deltas.values()) / 10 == pytest.approx(cmp.difference)


def test_the_gate_accepts_a_clearly_better_challenger():
    ok, why = judge(compare(*_vectors(1000, 900, 40, 15)), PromoteParams())
    assert ok, why
    assert "significant" in why and "McNemar p=" in why


def test_the_gate_refuses_a_gain_that_is_not_significant():
    cmp = compare(*_vectors(1000, 900, 8, 5))  # +0.3 points, 8 rows against 5
    assert cmp.difference > 0
    ok, why = judge(cmp, PromoteParams())
    assert not ok and "not significant" in why


def test_the_gate_refuses_a_significant_gain_below_the_minimum_effect():
    cmp = compare(*_vectors(1000, 900, 40, 15))
    ok, why = judge(cmp, PromoteParams(min_effect=0.05))
    assert not ok and "below the minimum effect" in why and "not significant" not in why
    assert judge(cmp, PromoteParams(min_effect=0.02))[0]


def test_the_gate_refuses_a_challenger_that_regresses_one_class():
    y, cand, champ = _vectors(1000, 900, 60, 0)
    hurt = np.flatnonzero((y == 3) & (cand == y) & (champ == y))[:15]  # 15 of 100 rows
    cand[hurt] = (y[hurt] + 1) % 10
    cmp = compare(y, cand, champ)
    assert cmp.difference > 0 and cmp.p_value < 0.05  # better overall, and significantly
    ok, why = judge(cmp, PromoteParams(max_class_drop=0.05))
    assert not ok and "class 3" in why
    assert cmp.class_deltas[3] == pytest.approx(0.06 - 0.15)  # its 6 gains, 15 losses
    assert judge(cmp, PromoteParams(max_class_drop=0.1))[0]


def test_the_comparison_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="same, non-empty"):
        compare(np.array([1, 2]), np.array([1]), np.array([1, 2]))


def test_paired_gate_on_real_models_records_the_test_in_the_ledger(prepared, settings, params):
    x, y = raw_test_set(settings.processed_dir, load_preprocessor(settings.processed_dir).schema)
    weak = fit(settings, params.updated(train={"epochs": 1, "lr": 1e-5}), show_progress=False)
    promote_if_better(settings, weak.version, x, y, margin=0.0)
    strong = fit(settings, params, epochs=6, show_progress=False)
    # the same strong model against itself-level noise would be refused; against the weak
    # one (barely trained) the gain is large and significant
    decision = promote_paired(settings, strong.version, x, y, PromoteParams())
    assert decision.promoted, decision.reason
    assert alias_version(settings.model_name, CHAMPION) == strong.version
    entry = ledger(settings)[0]
    assert entry["action"] == "promote" and entry["test"] == "paired"
    assert entry["metrics"]["p_value"] < 0.05
    assert entry["metrics"]["paired_rows"] == len(y)
    assert "class_0_recall_delta" in entry["metrics"]
    # a rerun of the weak version against the strong champion: refused, and why is recorded
    again = promote_paired(settings, weak.version, x, y, PromoteParams())
    assert not again.promoted and "not significant" in again.reason
    assert ledger(settings)[0]["action"] == "reject"


def test_params_choose_the_rule(prepared, settings):
    assert Params().promote.test == "paired"
    with pytest.raises(ValueError):
        Params.model_validate({"promote": {"test": "vibes"}})
