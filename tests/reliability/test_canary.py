"""A canary across two server workers sharing a PostgreSQL store: every worker routes a
client to the same version, a less accurate candidate is rolled back under load with no
failed client request, and the champion then takes all the traffic."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pipeline import rollout
from pipeline.config import RolloutParams, get_settings
from pipeline.ledger import entries as ledger
from pipeline.registry import CHAMPION, alias_version
from pipeline.store import PredictionStore
from tests.serving.helpers import digits_stream
from tests.serving.test_rollout import _register

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def test_canary_over_two_workers_on_postgresql_rolls_back_a_worse_candidate(
    served, live_server, pg_url, monkeypatch
):
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", pg_url)
    get_settings.cache_clear()
    settings = get_settings()
    candidate = _register(weak=True)
    server = live_server(
        workers=2, env={"MLOPS_PREDICTION_DB_URL": pg_url, "MLOPS_ROLLOUT_POLL_S": "0.2"}
    )
    guards = RolloutParams(
        fraction=0.5, window_s=300, check_interval_s=0.2, min_samples=60, min_labels=40,
        p99_slack_ms=10_000,
    )  # fmt: skip
    rollout.start(settings, candidate, guards)
    # both workers route to a loaded candidate before any user comes: twenty answers in a
    # row on new connections (each lands on either worker) say so; a user who came while
    # one worker still loaded it could be sent to both versions
    in_a_row, deadline = 0, time.monotonic() + 120
    while in_a_row < 20 and time.monotonic() < deadline:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            canary = http.get("/model").json().get("canary") or {}
        loaded = canary.get("candidate") == candidate and canary.get("candidate_loaded")
        in_a_row = in_a_row + 1 if loaded else 0
        time.sleep(0 if loaded else 0.1)
    assert in_a_row == 20, "the workers did not take up the canary"
    frame = digits_stream()
    x, y = frame.drop(columns="label").to_numpy().tolist(), frame["label"].tolist()
    seen: dict[str, list[tuple[float, str]]] = {}  # user -> (answered at, version) each
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        n = 0
        while not stop.is_set() and n < 400:
            cid, pid = f"user-{k}-{n // 3}", f"p-{k}-{n}"  # each user asks three times
            row = (k * 400 + n) % len(x)
            try:
                with httpx.Client(base_url=server.url, timeout=30) as http:  # a new connection
                    res = http.post(
                        "/predict",
                        json={"instances": [x[row]], "ids": [pid]},
                        headers={"X-Client-Id": cid},
                    )
                    if res.status_code == 200:
                        fb = http.post(
                            "/feedback", json={"labels": [{"id": pid, "label": int(y[row])}]}
                        )
                        if fb.status_code != 200:
                            raise RuntimeError(f"feedback {fb.status_code}")
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                with lock:
                    failures.append(repr(exc))
                n += 1
                continue
            with lock:
                if res.status_code != 200:
                    failures.append(f"{res.status_code} {res.text[:200]}")
                else:
                    answer = (time.time(), res.headers["X-Model-Version"])
                    seen.setdefault(cid, []).append(answer)
            n += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    store = PredictionStore(pg_url)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and store.running_rollout(settings.model_name):
            time.sleep(0.2)
        ended = store.latest_rollout(settings.model_name)
        time.sleep(1.0)  # both workers notice the end; traffic goes on meanwhile
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.dispose()
    assert failures == []
    assert ended["state"] == "aborted" and "accuracy" in ended["reason"]
    assert alias_version(settings.model_name, CHAMPION) == "1"
    served_by = [v for answers in seen.values() for _, v in answers]
    assert candidate in served_by and "1" in served_by
    # sticky across workers: while the canary ran, a user saw one version. The workers
    # notice the rollback each on its own poll (0.2 s), so users answered in the last half
    # second before it are left out: they may rightly have seen both
    settled = {
        c: {v for _, v in answers}
        for c, answers in seen.items()
        if max(t for t, _ in answers) < ended["ended_at"] - 0.5
    }
    assert len(settled) >= 10, len(settled)
    assert [c for c, versions in settled.items() if len(versions) > 1] == []
    entry = ledger(settings)[0]
    assert entry["action"] == "rollout-abort"
    assert entry["metrics"]["candidate_accuracy"] < entry["metrics"]["champion_accuracy"]
