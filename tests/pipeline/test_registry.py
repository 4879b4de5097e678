"""Registry, gate and ledger against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.config import Params
from pipeline.experiment import fit
from pipeline.gate import promote_if_better
from pipeline.ledger import entries as ledger
from pipeline.model import Predictor
from pipeline.preprocess import load_preprocessor, raw_test_set
from pipeline.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    alias_version,
    load_predictor,
    rollback,
    set_champion,
)
from pipeline.tracking import RegistryUnavailable, configure_tracking


def _test_set(settings):
    return raw_test_set(settings.processed_dir, load_preprocessor(settings.processed_dir).schema)


def _weak(params: Params) -> Params:
    return params.updated(train={"epochs": 1, "lr": 1e-5})


def _fit(settings, params, **kw):
    return fit(settings, params, epochs=kw.pop("epochs", 6), show_progress=False, **kw)


def test_gate_promotes_first_rejects_weaker_and_rollback_restores(prepared, settings, params):
    x, y = _test_set(settings)
    first = _fit(settings, params)
    assert first.version == "1"
    d1 = promote_if_better(settings, first.version, x, y, margin=0.0)
    assert d1.promoted and d1.reason == "first version"
    assert alias_version(settings.model_name, CHAMPION) == "1"

    weak = fit(settings, _weak(params), show_progress=False)
    d2 = promote_if_better(settings, weak.version, x, y, margin=0.0)
    assert not d2.promoted and d2.candidate_score < d2.champion_score
    assert d2.reason.startswith(f"v{weak.version} accuracy") and "champion v1" in d2.reason
    assert alias_version(settings.model_name, CHAMPION) == "1"
    assert alias_version(settings.model_name, CHALLENGER) == weak.version

    set_champion(settings, weak.version, reason="test: force the weak one")
    assert alias_version(settings.model_name, CHAMPION) == weak.version
    came_from, went_to = rollback(settings)
    assert (came_from, went_to) == (weak.version, "1")
    assert alias_version(settings.model_name, CHAMPION) == "1"

    actions = [(e["action"], e["from"], e["to"]) for e in ledger(settings)]
    assert actions == [
        ("rollback", weak.version, "1"),
        ("promote", "1", weak.version),
        ("reject", "1", "1"),
        ("promote", None, "1"),
    ]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(settings)


def test_better_challenger_is_promoted_and_old_champion_kept(prepared, settings, params):
    x, y = _test_set(settings)
    weak = fit(settings, _weak(params), show_progress=False)
    promote_if_better(settings, weak.version, x, y, margin=0.0)
    strong = _fit(settings, params, epochs=10)
    decision = promote_if_better(settings, strong.version, x, y, margin=0.05)
    assert decision.promoted, decision.reason
    assert alias_version(settings.model_name, CHAMPION) == strong.version
    assert alias_version(settings.model_name, CHALLENGER) == weak.version


def test_a_tie_keeps_the_champion(prepared, settings, params):
    x, y = _test_set(settings)
    a = _fit(settings, params)
    promote_if_better(settings, a.version, x, y, margin=0.0)
    b = _fit(settings, params)  # identical seed and data: identical accuracy
    decision = promote_if_better(settings, b.version, x, y, margin=0.0)
    assert not decision.promoted and decision.candidate_score == decision.champion_score


def test_a_positive_margin_blocks_a_smaller_gain_and_passes_a_larger_one(
    prepared, settings, params
):
    x, y = _test_set(settings)
    weak = fit(settings, _weak(params), show_progress=False)
    promote_if_better(settings, weak.version, x, y, margin=0.0)
    strong = _fit(settings, params)
    blocked = promote_if_better(settings, strong.version, x, y, margin=1.0)
    gain = blocked.candidate_score - blocked.champion_score
    assert gain > 0 and not blocked.promoted and "does not beat" in blocked.reason
    assert alias_version(settings.model_name, CHAMPION) == weak.version
    just_short = promote_if_better(settings, strong.version, x, y, margin=gain * 1.01)
    assert not just_short.promoted
    passed = promote_if_better(settings, strong.version, x, y, margin=gain / 2)
    assert passed.promoted and alias_version(settings.model_name, CHAMPION) == strong.version


def test_lineage_tags_params_and_artifacts(prepared, settings, params):
    cand = _fit(settings, params, epochs=3)
    client = mlflow.MlflowClient()
    mv = client.get_model_version(settings.model_name, cand.version)
    run = client.get_run(cand.run_id)
    for tags in (mv.tags, run.data.tags):
        assert tags["data_hash"] == prepared.data_hash
        assert tags["warm_start"] == "false" and tags["device"] == "cpu"
        assert tags["data_source"] == "digits" and "git_commit" in tags
    assert run.data.params["lr"] == str(params.train.lr)
    assert json.loads(mv.tags["params"])["epochs"] == "3"
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1
    history = client.get_metric_history(cand.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1))
    artifacts = {a.path for a in client.list_artifacts(cand.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/loss_curve.png",
        "evaluation/per_class.json",
    } <= artifacts


def test_mlflow_pyfunc_agrees_with_own_predictor(prepared, settings, params):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cand = _fit(settings, params, epochs=3)
        mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{cand.version}")
    assert not [w for w in caught if "type hints" in str(w.message)]
    x, _ = _test_set(settings)
    own, _ = load_predictor(settings.model_name, cand.version)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{cand.version}")
    frame = pd.DataFrame(x, columns=list(own.feature_names))
    out = pyfunc.predict(frame)
    np.testing.assert_array_equal(out["label"].to_numpy(), own.predict(x))
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), own.predict_proba(x), atol=1e-6)
    assert pyfunc.metadata.get_input_schema().input_names()[:2] == ["pixel0", "pixel1"]


def test_warm_start_from_champion_is_recorded(prepared, settings, params):
    x, y = _test_set(settings)
    first = _fit(settings, params, epochs=3)
    promote_if_better(settings, first.version, x, y, margin=0.0)
    warm = _fit(settings, params, epochs=2, warm_start=True)
    tags = mlflow.MlflowClient().get_run(warm.run_id).data.tags
    assert tags["warm_start"] == "true" and tags["warm_start_from"] == first.version
    assert warm.warm_started


def test_tuning_logs_nested_trials_and_best_params(prepared, settings, params):
    cand = fit(settings, params, trials=3, epochs=3, show_progress=False)
    exp = mlflow.get_experiment_by_name(settings.model_name)
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "train-tune")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3
    assert {"best_lr", "best_batch_size", "best_hidden"} <= parent.data.params.keys()
    final = mlflow.MlflowClient().get_run(cand.run_id)
    assert final.data.params["batch_size"] == parent.data.params["best_batch_size"]


def test_unreachable_registry_fails_fast_and_clearly(settings, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=r"http://127\.0\.0\.1:9 is unreachable"):
        configure_tracking(settings)
    assert time.monotonic() - start < 60


def test_unknown_version_is_a_clear_error(prepared, settings, params):
    _fit(settings, params, epochs=1)
    with pytest.raises(RegistryError, match="no version '42'"):
        set_champion(settings, "42")
    assert isinstance(load_predictor(settings.model_name, "1")[0], Predictor)


def test_a_pruned_trial_is_a_finished_run_tagged_pruned(prepared, settings, params, monkeypatch):
    """Optuna prunes trial 1 (forced here; the pruner itself is Optuna's): its MLflow run
    ends FINISHED with pruned=true, not FAILED, and the study goes on."""
    import optuna

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    fit(settings, params, trials=3, epochs=2, register_model=False, show_progress=False)
    exp = mlflow.get_experiment_by_name(settings.model_name)
    runs = {
        r.info.run_name: r for r in mlflow.search_runs([exp.experiment_id], output_format="list")
    }
    assert runs["trial-1"].data.tags.get("pruned") == "true"
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert runs["trial-0"].data.metrics["best_val_loss"] > 0


def test_concurrent_promotions_and_rollbacks_leave_alias_and_ledger_agreeing(
    prepared, settings, params
):
    """Eight concurrent pairs of `promote v2` and `rollback` (the lock lives in the
    prediction store's database, which every process shares): afterwards the champion
    alias is the ledger's champion, the challenger is another version, and a serial
    rollback moves from one version to another (never "v1 -> v1")."""
    import threading

    x, y = _test_set(settings)
    first = _fit(settings, params, epochs=2)
    promote_if_better(settings, first.version, x, y, margin=0.0)
    second = _fit(settings, params, epochs=2)
    errors: list[str] = []

    def promote() -> None:
        try:
            set_champion(settings, second.version, reason="race")
        except RegistryError as exc:
            errors.append(str(exc))

    def back() -> None:
        try:
            rollback(settings, reason="race")
        except RegistryError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=f) for _ in range(8) for f in (promote, back)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all("already the champion" in e or "no previous champion" in e for e in errors), errors
    from pipeline.ledger import champion_history

    champion = alias_version(settings.model_name, CHAMPION)
    assert champion == champion_history(settings)[-1]
    assert alias_version(settings.model_name, CHALLENGER) != champion
    if len(champion_history(settings)) >= 2:
        came_from, went_to = rollback(settings)
        assert came_from != went_to and came_from == champion


def test_a_version_that_cannot_load_is_not_promoted(prepared, settings, params):
    x, y = _test_set(settings)
    first = _fit(settings, params, epochs=2)
    promote_if_better(settings, first.version, x, y, margin=0.0)
    broken = _fit(settings, params, epochs=2)
    # break every stored copy of the checkpoint (the artifact store is this temp project's)
    for path in settings.root.rglob("checkpoint.pt"):
        if "mlartifacts" in path.parts or "mlruns" in path.parts:
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(RegistryError, match=f"v{broken.version} cannot be loaded"):
        set_champion(settings, broken.version)
    assert alias_version(settings.model_name, CHAMPION) == first.version
    assert [e["action"] for e in ledger(settings)] == ["promote"]


def test_the_ui_opens_on_runs_and_the_ledger_shows_its_decisions(prepared, settings, params):
    """The training and ledger experiments are marked as model development and carry the
    project's column view (what the UI renders from them: tests/e2e/test_mlflow_ui.py), and
    a ledger entry carries its decision in visible fields: run name, params, description."""
    x, y = _test_set(settings)
    first = _fit(settings, params, epochs=2)
    promote_if_better(settings, first.version, x, y, margin=0.0)
    client = mlflow.MlflowClient()
    for name in (settings.model_name, f"{settings.model_name}-promotions"):
        experiment = client.get_experiment_by_name(name)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", name
        view = json.loads(experiment.tags["mlflow.sharedViewState.mlops"])
        assert (
            "metrics.`test_accuracy`" in view["selectedColumns"]
            or "params.`action`" in (view["selectedColumns"])
        )
    ledger_exp = client.get_experiment_by_name(f"{settings.model_name}-promotions")
    [run] = client.search_runs([ledger_exp.experiment_id])
    assert run.info.run_name == "promote v1: v- -> v1"
    assert run.data.params == {
        "action": "promote",
        "from": "-",
        "to": "1",
        "reason": "first version",
    }
    assert run.data.tags["mlflow.note.content"] == "first version"
