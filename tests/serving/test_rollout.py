"""Shadow scoring and canary rollouts on the real server app, a real MLflow registry with
real trained versions, and a real SQLite prediction store in the test's project."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline import rollout
from pipeline.config import RolloutParams, get_settings
from pipeline.ledger import entries as ledger
from pipeline.registry import CHAMPION, alias_version
from pipeline.store import PredictionStore, encode_rows, rollouts
from serving.app import create_app
from tests.serving.helpers import digits_stream


def _register(weak: bool) -> str:
    """Train and register one more version of the served model (not promoted)."""
    from pipeline.config import load_params
    from pipeline.experiment import fit
    from pipeline.tracking import configure_tracking

    settings = get_settings()
    configure_tracking(settings)
    params = load_params(settings.params_path)
    if weak:  # barely trained: far less accurate than the champion
        params = params.updated(train={"lr": 1e-5})
    return fit(settings, params, epochs=1 if weak else 3, show_progress=False).version


def _app(monkeypatch, **env: str) -> TestClient:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return TestClient(create_app(get_settings()))


@pytest.fixture
def stream():
    frame = digits_stream()
    return frame.drop(columns="label").to_numpy(np.float32), frame["label"].to_numpy()


def _store() -> PredictionStore:
    return PredictionStore(get_settings().prediction_db).create()


def _counter(text: str, name: str) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


# --- shadow -----------------------------------------------------------------------------------


def test_shadow_leaves_answers_alone_logs_its_own_and_compares_on_labels(
    served, monkeypatch, stream
):
    x, y = stream
    candidate = _register(weak=True)
    rows, ids = x[:120], [f"s-{k}" for k in range(120)]
    bodies = [
        {"instances": rows[k : k + 8].tolist(), "ids": ids[k : k + 8]} for k in range(0, 120, 8)
    ]
    with _app(monkeypatch, MLOPS_PREDICTION_DB_URL=f"sqlite:///{served / 'plain.db'}") as c:
        plain = [c.post("/predict", json=b).json() for b in bodies]
    with _app(
        monkeypatch,
        MLOPS_PREDICTION_DB_URL=f"sqlite:///{served / 'shadow.db'}",
        MLOPS_SHADOW_MODEL=candidate,
    ) as c:
        state = c.app.state.mlops
        _wait(lambda: state.shadow.manager.current is not None)
        scored0 = _counter(c.get("/metrics").text, 'mlops_shadow_rows_total{outcome="scored"}')
        shadowed = [c.post("/predict", json=b).json() for b in bodies]
        assert shadowed == plain  # same labels, probabilities, ids and version (the champion)
        assert {p["model_version"] for p in shadowed} == {"1"}
        _wait(lambda: state.shadow.counts["scored"] == 120)
        store = _store()
        _wait(lambda: store.shadow_summary(get_settings().model_name))
        labels = [{"id": i, "label": int(t)} for i, t in zip(ids, y[:120], strict=True)]
        assert c.post("/feedback", json={"labels": labels}).status_code == 200
        # the last shadow answers may still be on their way to the log: each is counted
        # once it lands, though its label came first
        _wait(
            lambda: (
                state.shadow._summarise() or [s["labelled"] for s in state.shadow.summary] == [120]
            )
        )
        (summary,) = state.shadow.summary
        assert summary["champion"] == "1" and summary["shadow"] == candidate
        state.shadow._summarise()  # incremental: the same labels are not counted twice
        assert state.shadow.summary[0]["labelled"] == 120
        (whole,) = store.shadow_summary(get_settings().model_name)  # mlops status's figure
        assert whole["rows"] == 120 and whole["labelled"] == 120
        assert whole["shadow_accuracy"] == pytest.approx(summary["shadow_accuracy"])
        truth = y[:120]
        champion_labels = np.array([p["label"] for b in shadowed for p in b["predictions"]])
        assert summary["champion_accuracy"] == pytest.approx((champion_labels == truth).mean())
        assert summary["shadow_accuracy"] < summary["champion_accuracy"]  # the weak one
        metrics = c.get("/metrics").text
        # the counter is the process's (other tests' shadows count too): 120 more than before
        assert _counter(metrics, 'mlops_shadow_rows_total{outcome="scored"}') - scored0 == 120
        assert 'mlops_shadow{figure="shadow_accuracy"}' in metrics
        assert c.get("/model").json()["shadow"]["model_version"] == candidate
        # the gate reads the same labelled shadow rows
        y_s, cand_s, champ_s = store.shadow_pairs(get_settings().model_name, candidate, "1")
        assert len(y_s) == 120 and (champ_s == champion_labels).all()


def test_a_shadow_joins_the_rows_of_requests_the_server_named(served, monkeypatch, stream):
    """With a shadow on, requests without client ids are logged row by row (the shadow's
    figures join rows by id), so every shadowed row counts."""
    x, y = stream
    candidate = _register(weak=True)
    with _app(monkeypatch, MLOPS_SHADOW_MODEL=candidate) as c:
        state = c.app.state.mlops
        _wait(lambda: state.shadow.manager.current is not None)
        answers = [c.post("/predict", json={"instances": x[k : k + 8].tolist()}).json()
                   for k in range(0, 40, 8)]  # fmt: skip
        ids = [p["id"] for a in answers for p in a["predictions"]]
        _wait(lambda: state.shadow.counts["scored"] >= 40)
        store = _store()
        # every answer written (the writer commits them a moment after they are scored)
        _wait(
            lambda: (store.shadow_summary(get_settings().model_name) or [{}])[0].get("rows") == 40
        )
        labels = [{"id": i, "label": int(t)} for i, t in zip(ids, y[:40], strict=True)]
        assert c.post("/feedback", json={"labels": labels}).status_code == 200
        (whole,) = store.shadow_summary(get_settings().model_name)
        assert whole["rows"] == 40 and whole["labelled"] == 40


def test_a_shadow_that_cannot_load_costs_nothing_but_its_rows(served, monkeypatch, stream):
    x, _ = stream
    with _app(monkeypatch, MLOPS_SHADOW_MODEL="99") as c:
        state = c.app.state.mlops
        _wait(lambda: state.shadow.manager.last_error)
        res = c.post("/predict", json={"instances": x[:4].tolist()})
        assert res.status_code == 200 and res.json()["model_version"] == "1"
        _wait(lambda: state.shadow.counts["skipped"] == 4)
        assert "99" in c.get("/model").json()["shadow"]["last_error"]


# --- canary -----------------------------------------------------------------------------------


def _as_client(c, rows, client: str, ids: list[str] | None = None):
    """POST /predict as the named client (the canary's sticky key)."""
    body = {"instances": rows.tolist(), **({"ids": ids} if ids else {})}
    return c.post("/predict", json=body, headers={"X-Client-Id": client})


def _guards(**kw) -> RolloutParams:
    base = dict(fraction=0.3, window_s=3, check_interval_s=0.1, min_samples=40, min_labels=30)
    return RolloutParams(**{**base, **kw})


def test_canary_splits_by_client_sticks_and_a_good_candidate_is_promoted(
    served, monkeypatch, stream
):
    x, y = stream
    candidate = _register(weak=False)
    settings = get_settings()
    with _app(monkeypatch, MLOPS_ROLLOUT_POLL_S="0.1") as c:
        state = c.app.state.mlops
        # a window no machine ends while the split and stickiness are seen (400 requests
        # took over 4 s in a full suite run); once they are, the start is moved back by it
        window = 600
        started = rollout.start(settings, candidate, _guards(p99_slack_ms=1000, window_s=window))
        assert started["champion"] == "1"
        _wait(lambda: state.canary.rollout is not None and state.canary.manager.current)
        seen: dict[str, str] = {}
        for k in range(400):
            res = _as_client(c, x[k : k + 1], f"client-{k}")
            assert res.status_code == 200
            seen[f"client-{k}"] = res.headers["X-Model-Version"]
        share = sum(v == candidate for v in seen.values()) / len(seen)
        sd = (0.3 * 0.7 / len(seen)) ** 0.5
        assert abs(share - 0.3) < 4 * sd, share  # the split holds within binomial bounds
        for client in list(seen)[:40]:  # sticky: a client keeps its version
            res = _as_client(c, x[:1], client)
            assert res.headers["X-Model-Version"] == seen[client]
        assert state.canary.rollout is not None  # all of that while the canary ran
        with _store().engine.begin() as conn:  # the window is over: the servers promote
            conn.execute(
                rollouts.update()
                .where(rollouts.c.seq == started["seq"])
                .values(started_at=rollouts.c.started_at - window)
            )
        _wait(lambda: alias_version(settings.model_name, CHAMPION) == candidate, timeout=60)
        _wait(lambda: state.manager.current.version == candidate)
    actions = [e["action"] for e in ledger(settings)]
    assert actions[:2] == ["promote", "rollout-start"]
    promoted = ledger(settings)[0]
    assert "canary" in promoted["reason"] and promoted["metrics"]["candidate_rows"] >= 40
    assert _store().latest_rollout(settings.model_name)["state"] == "promoted"


def test_a_less_accurate_canary_is_rolled_back_under_load_with_no_failed_request(
    served, monkeypatch, stream
):
    x, y = stream
    candidate = _register(weak=True)
    settings = get_settings()
    with _app(monkeypatch, MLOPS_ROLLOUT_POLL_S="0.1") as c:
        state = c.app.state.mlops
        rollout.start(settings, candidate, _guards(fraction=0.5, window_s=120, p99_slack_ms=1e4))
        _wait(lambda: state.canary.rollout is not None and state.canary.manager.current)
        failed, versions = 0, []
        for k in range(0, 600, 4):
            ids = [f"c-{k + j}" for j in range(4)]
            res = _as_client(c, x[k : k + 4], f"client-{k}", ids)
            failed += res.status_code != 200
            versions.append(res.headers.get("X-Model-Version"))
            labels = [{"id": i, "label": int(t)} for i, t in zip(ids, y[k : k + 4], strict=True)]
            failed += c.post("/feedback", json={"labels": labels}).status_code != 200
            if state.canary.rollout is None and k > 200:
                break
        assert failed == 0
        _wait(lambda: state.canary.rollout is None, timeout=30)
        assert candidate in versions  # it did serve before the guard rails caught it
    assert alias_version(settings.model_name, CHAMPION) == "1"
    entry = ledger(settings)[0]
    assert entry["action"] == "rollout-abort" and "accuracy" in entry["reason"]
    assert entry["metrics"]["candidate_accuracy"] < entry["metrics"]["champion_accuracy"]
    assert _store().latest_rollout(settings.model_name)["state"] == "aborted"


def _fake_rollout(store: PredictionStore, guards: RolloutParams) -> dict:
    seq = store.start_rollout("m", "2", "1", guards.fraction, guards.model_dump_json())
    return store.running_rollout("m") | {"seq": seq}


def _log(store: PredictionStore, version: str, n: int, latency_ms: float, start: int = 0):
    now = time.time()
    row = encode_rows(np.zeros((1, 4), np.float32))[0]
    store.insert(
        [(f"{version}-{start + k}", now, "m", version, row, 0, row, latency_ms) for k in range(n)]
    )


def test_guard_rails_on_logged_rows_error_rate_latency_and_waiting(tmp_path):
    """`evaluate` on rows really logged in a store: each guard trips on its own cause."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'p.db'}").create()
    guards = _guards(min_samples=100, max_error_rate=0.05, max_p99_ratio=2.0, p99_slack_ms=5)
    r = _fake_rollout(store, guards)
    _log(store, "1", 300, 2.0)
    _log(store, "2", 50, 2.5)
    assert rollout.evaluate(store, r).decision == "wait"  # 50 rows of 100
    _log(store, "2", 100, 2.5, start=50)
    assert rollout.evaluate(store, r).decision == "wait"  # healthy, window not over
    assert rollout.evaluate(store, r, now=r["started_at"] + 10).decision == "promote"
    store.add_event("m", "2", "canary_failed", 20)  # 20 of 170 rows failed: 12%
    verdict = rollout.evaluate(store, r)
    assert verdict.decision == "abort" and "error rate" in verdict.reasons[0]
    store.end_rollout(r["seq"], "aborted", "test")
    slow_store = PredictionStore(f"sqlite:///{tmp_path / 'q.db'}").create()
    r2 = _fake_rollout(slow_store, guards)
    _log(slow_store, "1", 300, 2.0)
    _log(slow_store, "2", 150, 40.0)  # 40 ms against 2 x 2 + 5 = 9 ms
    verdict = rollout.evaluate(slow_store, r2)
    assert verdict.decision == "abort" and "p99" in verdict.reasons[0]
    assert verdict.figures["candidate_p99_ms"] == pytest.approx(40.0)


def test_with_require_labels_a_window_over_waits_until_accuracy_is_judged(tmp_path):
    """Where the labels are sure to come (the loop posts them), a canary whose window ends
    before they do is not promoted unjudged: it waits, then accuracy decides."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'p.db'}").create()
    guards = _guards(min_samples=10, min_labels=10, require_labels=True)
    r = _fake_rollout(store, guards)
    _log(store, "1", 40, 2.0)
    _log(store, "2", 40, 2.0)
    later = r["started_at"] + guards.window_s + 1
    verdict = rollout.evaluate(store, r, now=later)
    assert verdict.decision == "wait" and "accuracy not judged" in verdict.reasons[0]
    default = r | {"guards": guards.model_copy(update={"require_labels": False}).model_dump_json()}
    assert rollout.evaluate(store, default, now=later).decision == "promote"
    # champion right on all 20 labelled rows, the candidate on 10: rolled back
    store.add_labels([(f"1-{k}", 0) for k in range(20)] + [(f"2-{k}", k % 2) for k in range(20)])
    verdict = rollout.evaluate(store, r, now=later)
    assert verdict.decision == "abort" and "accuracy" in verdict.reasons[0]


def test_one_rollout_at_a_time_and_manual_abort(served, monkeypatch):
    candidate = _register(weak=True)
    settings = get_settings()
    rollout.start(settings, candidate, _guards())
    with pytest.raises(Exception, match="already running"):
        rollout.start(settings, candidate, _guards())
    ended = rollout.finish(settings, "abort", "changed my mind")
    assert ended["state"] == "aborted"
    assert ledger(settings)[0]["action"] == "rollout-abort"
    assert alias_version(settings.model_name, CHAMPION) == "1"
    with pytest.raises(Exception, match="no rollout is running"):
        rollout.finish(settings, "promote", "x")


def _break_artifacts(version: str) -> None:
    """Corrupt a registered version's checkpoint where the registry keeps it, as a bad
    upload or a disk fault would: it loaded when the rollout started, not any more."""
    import mlflow

    client = mlflow.MlflowClient()
    source = client.get_model_version(get_settings().model_name, version).source
    location = mlflow.get_logged_model(source.split("/")[-1]).artifact_location
    path = location.removeprefix("file://")
    from pathlib import Path

    checkpoints = list(Path(path).rglob("checkpoint.pt"))
    assert checkpoints, path
    for ckpt in checkpoints:
        ckpt.write_bytes(b"not a checkpoint")


def test_a_canary_that_fails_is_answered_by_the_champion_and_rolled_back(
    served, monkeypatch, stream
):
    x, _ = stream
    candidate = _register(weak=False)
    settings = get_settings()
    rollout.start(settings, candidate, _guards(fraction=0.5, min_samples=30, window_s=120))
    _break_artifacts(candidate)
    with _app(monkeypatch, MLOPS_ROLLOUT_POLL_S="0.1") as c:
        state = c.app.state.mlops
        _wait(lambda: state.canary.rollout is not None)
        statuses, versions = [], set()
        for k in range(200):
            res = _as_client(c, x[k : k + 1], f"client-{k}")
            statuses.append(res.status_code)
            versions.add(res.headers["X-Model-Version"])
            if state.canary.rollout is None:
                break
        _wait(lambda: state.canary.rollout is None, timeout=30)
        assert "canary_rows_total" in c.get("/metrics").text
    assert set(statuses) == {200} and versions == {"1"}  # the champion answered them all
    entry = ledger(settings)[0]
    assert entry["action"] == "rollout-abort" and "error rate" in entry["reason"]
    assert entry["metrics"]["candidate_failed_rows"] >= 30
    assert alias_version(settings.model_name, CHAMPION) == "1"


def test_metrics_show_the_monitors_latest_window_per_version(served, monkeypatch):
    import json

    window = {
        "version": "1", "start": 0.0, "end": 3600.0, "rows": 200, "labelled": 150,
        "coverage": 0.75, "latency_p50_s": 42.0, "latency_p90_s": 90.0, "mature": True,
        "realized": 0.91, "estimated": 0.93, "estimated_low": 0.88, "estimated_high": 0.98,
        "confidence_shift": 0.0, "status": "mature",
    }  # fmt: skip
    young = {**window, "version": "2", "coverage": 0.1, "mature": False, "realized": None}
    _store().add_performance(json.dumps([window, young]))
    with _app(monkeypatch) as c:
        text = c.get("/metrics").text
    assert 'mlops_live_performance{figure="realized_accuracy",version="1"} 0.91' in text
    assert 'mlops_live_performance{figure="label_coverage",version="2"} 0.1' in text
    # an immature window shows no realized accuracy at all, only its estimate
    assert 'figure="realized_accuracy",version="2"' not in text
    assert 'mlops_live_performance{figure="estimated_accuracy",version="2"} 0.93' in text


def _register_slow() -> str:
    """A real, much heavier network (512 and 1,024 filters) behind the champion's own
    preprocessor, logged and registered like any version: as accurate as chance, and
    really slow per request, which is what the latency guard is for."""
    import dataclasses

    import mlflow

    from pipeline.model import Predictor, build_model
    from pipeline.registry import load_predictor, register
    from pipeline.tracking import configure_tracking, log_model

    settings = get_settings()
    configure_tracking(settings)
    champion, _ = load_predictor(settings.model_name, "champion")
    cfg = dataclasses.replace(champion.cfg, conv_filters=512)
    slow = Predictor(build_model(cfg), cfg, champion.preprocessor)
    with mlflow.start_run(run_name="slow") as run:
        pass
    example = np.zeros((2, cfg.n_features), np.float32)
    return register(log_model(run.info.run_id, slow, example), settings.model_name, {})


def test_a_slow_canary_is_rolled_back_on_its_p99_with_no_failed_request(
    served, monkeypatch, stream
):
    x, _ = stream
    candidate = _register_slow()
    settings = get_settings()
    guards = _guards(fraction=0.5, min_samples=40, window_s=120, max_p99_ratio=2.0, p99_slack_ms=2)
    rollout.start(settings, candidate, guards)
    with _app(monkeypatch, MLOPS_ROLLOUT_POLL_S="0.1") as c:
        state = c.app.state.mlops
        _wait(lambda: state.canary.rollout is not None and state.canary.manager.current)
        statuses, versions = [], set()
        for k in range(400):
            res = _as_client(c, x[k % 300 : k % 300 + 8], f"client-{k}")
            statuses.append(res.status_code)
            versions.add(res.headers["X-Model-Version"])
            if state.canary.rollout is None:
                break
        _wait(lambda: state.canary.rollout is None, timeout=30)
    assert set(statuses) == {200} and candidate in versions
    entry = ledger(settings)[0]
    assert entry["action"] == "rollout-abort" and "p99" in entry["reason"], entry["reason"]
    m = entry["metrics"]
    assert m["candidate_p99_ms"] > 2 * m["champion_p99_ms"] + 2
    assert alias_version(settings.model_name, CHAMPION) == "1"
