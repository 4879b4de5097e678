"""The prediction log on both backends: SQLite (WAL) and a real PostgreSQL."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from pipeline.feedback import _rows_to_frame
from pipeline.store import (
    BYTE_ROWS_FROM,
    GeneratedIds,
    LoggedRequest,
    PredictionStore,
    StoreUnavailable,
    decode_array,
    decode_rows,
    encode_feature_rows,
    encode_features,
    encode_rows,
    label_history,
    labelled_query,
    new_ids,
)
from pipeline.validate import Schema


@pytest.fixture
def store(store_on_both):
    return store_on_both


def _rows(ids, version="1"):
    x = np.arange(len(ids) * 64, dtype=np.float32).reshape(len(ids), 64)
    p = np.full((len(ids), 10), 0.1, np.float32)
    return [
        (i, time.time(), "m", version, f, 3, q, 2.5)
        for i, f, q in zip(ids, encode_rows(x), encode_rows(p), strict=True)
    ]


def test_insert_is_idempotent_and_round_trips(store):
    assert store.insert(_rows(["a", "b"])) == 2
    assert store.insert(_rows(["b", "c"])) == 1  # b already stored: skipped, not duplicated
    assert store.count() == 3
    row = store.get(["b"])["b"]
    assert row["features"] == list(map(float, range(64, 128)))
    assert row["probabilities"] == pytest.approx([0.1] * 10)
    assert row["model_version"] == "1" and row["latency_ms"] == 2.5


def _request(ids, seed=0, version="1"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(ids), 64)).astype(np.float32)
    p = rng.random((len(ids), 10)).astype(np.float32)
    labels = rng.integers(0, 300, len(ids)).tolist()  # beyond one byte, too
    return LoggedRequest(list(ids), time.time(), "m", version, x, labels, p, 1.25 + seed)


def test_whole_requests_log_the_rows_insert_logs(store, tmp_path):
    """The server's per-request statement (`insert_requests`: SQLite cuts the rows out of
    one blob and one JSON array each) stores exactly the rows `insert` stores from
    `LoggedRequest.rows()`, skips known ids the same way and counts only new rows; several
    requests are one commit. PostgreSQL takes the rows themselves."""
    client = ['q"uote', "back\\slash", "x" * 128, "é-not-ascii-but-json", "{}[],:"]
    first = _request(client + new_ids(59), seed=1)
    others = [_request(new_ids(n), seed=s) for s, n in ((2, 1), (3, 7), (4, 300))]
    assert store.insert_requests([first]) == 64
    assert store.insert_requests(others + [first]) == 308  # first's rows already there
    assert store.insert_requests([_request([client[0], "fresh"], seed=5)]) == 1
    assert store.count() == 64 + 308 + 1

    twin = PredictionStore(f"sqlite:///{tmp_path / 'rows.db'}").create()
    for request in [first, *others]:
        twin.insert(request.rows())
    ids = [i for r in [first, *others] for i in r.ids]
    got, expected = store.get(ids), twin.get(ids)
    assert set(got) == set(ids)
    for i in ids:
        assert got[i] == expected[i]  # every column, the arrays to the float32 bit
    row = got[client[1]]
    assert row["label"] == first.labels[1] and row["latency_ms"] == 2.25
    assert row["features"] == first.features[1].tolist()
    assert row["probabilities"] == first.probabilities[1].tolist()
    twin.dispose()
    with pytest.raises(ValueError, match="one id, row, label"):
        LoggedRequest(
            ["a", "b"], 0.0, "m", "1", np.zeros((1, 4)), [0, 0], np.zeros((2, 2)), 0.0
        ).parameters()


def test_a_group_that_fails_leaves_no_open_transaction(tmp_path, monkeypatch):
    """A request that cannot be bound fails its group before anything is written, and the
    next commits are committed (seen from another connection); a request of more rows
    than one statement takes is cut into several; an id with a NUL (which json_each would
    cut short) goes in as a row; an SQLite older than 3.38 gets the rows themselves."""
    import sqlite3

    import pipeline.store as store_module

    path = tmp_path / "log.db"
    store = PredictionStore(f"sqlite:///{path}").create()
    broken = _request(new_ids(3), seed=1)
    broken.labels = broken.labels[:2]  # one label short
    with pytest.raises(ValueError, match="one id, row, label"):
        store.insert_requests([_request(new_ids(2), seed=2), broken])
    assert store.insert_requests([_request(new_ids(3), seed=3)]) == 3

    def seen() -> int:
        with sqlite3.connect(path) as other:
            return other.execute("SELECT count(*) FROM predictions").fetchone()[0]

    assert seen() == 3

    monkeypatch.setattr(store_module, "_ROWS_PER_STATEMENT", 10)
    long = _request(new_ids(35), seed=4)
    nul = _request(["a\x00b", "a\x00c", "plain"], seed=5)
    assert store.insert_requests([long, nul]) == 38
    assert seen() == 41
    got = store.get(["a\x00b", "a\x00c", long.ids[34]])
    assert len(got) == 3 and got["a\x00c"]["label"] == nul.labels[1]
    assert got[long.ids[34]]["features"] == long.features[34].tolist()

    monkeypatch.setattr(store_module, "REQUEST_STATEMENTS", False)
    old = _request(new_ids(4), seed=6)
    assert store.insert_requests([old, old]) == 4
    assert store.get([old.ids[3]])[old.ids[3]]["label"] == old.labels[3]
    store.dispose()


@pytest.mark.parametrize("n", [1, 8, 64, 65537])  # one request's ids; past 16^4, random each
def test_new_ids_are_unique_rfc_uuid7_in_time_order(n):
    first = new_ids(n)
    time.sleep(0.002)  # the next millisecond
    later = new_ids(n)
    assert len(first) == len(later) == n and len(set(first + later)) == 2 * n
    for value in (first + later)[:2000]:
        parsed = uuid.UUID(hex=value)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and parsed.hex == value
    assert max(first) < min(later)  # inserts append at the index's right-hand edge
    stamp = int(later[0][:12], 16) / 1000
    assert abs(stamp - time.time()) < 5
    if n <= 16**4:  # one prefix for the request, and each row's index after it
        assert isinstance(first, GeneratedIds)
        assert first == [f"{first.prefix}{k:04x}" for k in range(n)]
    else:
        assert not isinstance(first, GeneratedIds)


def test_new_ids_random_bits_vary_between_requests():
    # the 58 bits after the version (12) and the variant (46) are random: each one varies
    ids = [new_ids(1)[0] for _ in range(500)]
    assert len(set(ids)) == 500
    bits = np.array([list(f"{uuid.UUID(hex=v).int:0128b}") for v in ids])
    bits = np.concatenate([bits[:, 52:64], bits[:, 66:112]], axis=1)
    assert (bits == "1").any(axis=0).all() and (bits == "0").any(axis=0).all()
    assert {v[-4:] for v in ids} == {"0000"}


def test_many_rows_in_one_group(store):
    ids = [f"id-{i}" for i in range(9000)]  # three multi-row statements, one transaction
    assert store.insert(_rows(ids[:10])) == 10
    assert store.insert(_rows(ids)) == 8990
    assert store.count() == 9000


def test_labels_and_watermark(store):
    store.insert(_rows(["a", "b", "c"]))
    out = store.add_labels([("a", 1), ("zzz", 2), ("a", 1)])
    assert [o.status for o in out] == ["labelled", "unknown_id", "unchanged"]
    conflict = store.add_labels([("a", 5), ("b", 2)])
    assert {o.id: o.status for o in conflict} == {"a": "conflict", "b": "labelled"}
    assert store.get(["b"])["b"]["true_label"] is None  # the whole request was refused
    store.add_labels([("a", 5)], overwrite=True)
    labelled = store.labelled_since(0)
    assert [(r["id"], r["true_label"]) for r in labelled] == [("a", 5)]
    assert store.labelled_since(labelled[-1]["labelled_at"]) == []


def test_labelled_index_holds_only_labelled_rows_and_serves_the_pull(store):
    import sqlalchemy as sa

    # a log made before the index was partial: create() swaps the old index for the new
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_predictions_labelled")
        conn.exec_driver_sql("CREATE INDEX ix_predictions_labelled_at ON predictions (labelled_at)")
    store.create()
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("predictions")}
    assert "ix_predictions_labelled" in names and "ix_predictions_labelled_at" not in names
    store.insert(_rows([f"p-{i}" for i in range(300)]))
    store.add_labels([("p-7", 1)])
    sql = str(labelled_query(0.5).compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            definition = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_predictions_labelled'"
            ).scalar()
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).fetchall()
        else:
            definition = conn.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_predictions_labelled'"
            ).scalar()
            conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: force the choice
            plan = conn.exec_driver_sql("EXPLAIN " + sql).fetchall()
    assert "labelled_at IS NOT NULL" in definition  # unlabelled inserts skip this index
    assert "ix_predictions_labelled" in str(plan)  # and the feedback pull still uses it
    assert [r["id"] for r in store.labelled_since(0)] == ["p-7"]


def test_drift_scores(store):
    assert store.latest_drift() is None
    store.add_drift(0.1, "{}")
    store.add_drift(0.7, "{}")
    assert store.latest_drift() == pytest.approx(0.7)


def test_insert_survives_its_connection_dying(pg_url):
    """A database restart kills the connection kept for inserts: the next insert opens a
    new one instead of failing the requests it carries."""
    import sqlalchemy as sa

    store = PredictionStore(pg_url).create()
    try:
        store.insert(_rows(["a"]))
        pid = store._insert_conn.driver_connection.info.backend_pid
        with sa.create_engine(pg_url).connect() as admin:
            assert admin.execute(sa.text(f"SELECT pg_terminate_backend({pid})")).scalar()
        assert store.insert(_rows(["b"])) == 1
        assert store._insert_conn.driver_connection.info.backend_pid != pid
        assert store.count() == 2
    finally:
        store.dispose()


def test_unreachable_store_raises_store_unavailable():
    store = PredictionStore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreUnavailable, match="prediction store postgresql"):
        store.insert(_rows(["a"]))
    with pytest.raises(StoreUnavailable):
        store.count()


@pytest.mark.parametrize("trial", range(3))
def test_tables_made_at_once_by_threads_and_processes_are_made_once(tmp_path, trial):
    """`create` from a server's threads (the writer's first commit, a label's request) and
    from other processes (another worker: stores of their own) at the same moment: every
    call returns, and the log has its tables. SQLite told the losers 'table ... already
    exists', which answered 503."""
    import threading

    url = f"sqlite:///{tmp_path / 'log.db'}"
    shared = PredictionStore(url)
    stores = [shared] * 4 + [PredictionStore(url) for _ in range(4)]
    barrier, errors = threading.Barrier(len(stores)), []

    def make(store):
        barrier.wait()
        try:
            store.create()
        except StoreUnavailable as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=make, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert shared.count() == 0 and shared.insert_requests([_request(["a"])]) == 1
    for store in set(stores):
        store.dispose()


def test_a_file_that_is_no_database_is_store_unavailable(tmp_path):
    path = tmp_path / "log.db"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreUnavailable, match="not a database"):
        PredictionStore(f"sqlite:///{path}").create()


def test_conflicting_labels_racing_for_one_id_have_one_winner(store):
    """Two workers (two engines on one database) label the same ids at the same moment
    with different labels: for every id exactly one request is told `labelled`, the other
    `conflict`, and the stored label is the winner's. (Before the compare-and-set, 17 of
    150 ids on SQLite and 64 of 150 on PostgreSQL had two winners.)"""
    import threading

    ids = new_ids(150)
    store.insert(_rows(ids))
    rival = PredictionStore(store.url)
    outcomes: dict[int, dict[str, str]] = {3: {}, 7: {}}
    barrier = threading.Barrier(2)

    def post(target: PredictionStore, label: int) -> None:
        for pid in ids:
            barrier.wait()
            [outcome] = target.add_labels([(pid, label)])
            outcomes[label][pid] = outcome.status

    workers = [
        threading.Thread(target=post, args=(store, 3)),
        threading.Thread(target=post, args=(rival, 7)),
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    rival.dispose()
    stored = {pid: row["true_label"] for pid, row in store.get(ids).items()}
    for pid in ids:
        pair = sorted([outcomes[3][pid], outcomes[7][pid]])
        assert pair == ["conflict", "labelled"], (pid, outcomes[3][pid], outcomes[7][pid])
        winner = 3 if outcomes[3][pid] == "labelled" else 7
        assert stored[pid] == winner


def test_an_overwrite_racing_another_replaces_the_label_it_was_told(store, monkeypatch):
    """Request A overwrites while request B is between its read (label 3) and its write:
    A waits for B (the label requests are decided one at a time over their rows), so B is
    told "was 3", A "was 5", and label_history holds the chain 3 -> 5 -> 4, not two
    overwrites of 3. (Before, A committed in between and B's write lost the compare-and-
    set and was decided again; B was then told "was 4".)"""
    import threading

    import pipeline.store as ps

    store.insert(_rows(["x"]))
    store.add_labels([("x", 3)])
    decide, a_told, a_thread = ps._label_outcomes, [], []

    def a_comes_meanwhile(labels, existing, overwrite, classes=None):
        if not a_thread and threading.current_thread().name == "B":
            a = threading.Thread(
                target=lambda: a_told.append(store.add_labels([("x", 4)], overwrite=True))
            )
            a_thread.append(a)
            a.start()
            time.sleep(0.3)  # time enough for A to commit, were it not kept waiting
        return decide(labels, existing, overwrite, classes)

    monkeypatch.setattr(ps, "_label_outcomes", a_comes_meanwhile)
    told = []
    b = threading.Thread(
        target=lambda: told.append(store.add_labels([("x", 5)], overwrite=True)), name="B"
    )
    b.start()
    b.join(timeout=60)
    a_thread[0].join(timeout=60)
    assert [(o.status, o.detail) for o in told[0]] == [("overwritten", "was 3")]
    assert [(o.status, o.detail) for o in a_told[0]] == [("overwritten", "was 5")]
    with store.engine.connect() as conn:
        chain = (
            conn.execute(
                sa.select(label_history.c.previous_label).order_by(label_history.c.labelled_at)
            )
            .scalars()
            .all()
        )
    assert chain == [3, 5] and store.get(["x"])["x"]["true_label"] == 4


def test_overlapping_label_requests_from_many_threads_are_each_decided_once(store):
    """Sixteen threads send overlapping requests of ten labels (the same label for an id
    everywhere, some with overwrite): none fails for the store, and each id is told
    `labelled` exactly once, the others `unchanged`. (Before, 2-9 of 640 such requests
    answered 503 "labels kept changing under us", and identical first labels answered
    `labelled` twice.)"""
    import threading

    ids = new_ids(100)
    store.insert(_rows(ids))
    truth = {pid: k % 10 for k, pid in enumerate(ids)}
    results: list[list] = []
    failures: list[BaseException] = []

    def post(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for k in range(12):
            chosen = rng.choice(len(ids), 10, replace=False)
            labels = [(ids[j], truth[ids[j]]) for j in chosen]
            try:
                results.append(store.add_labels(labels, overwrite=bool(k % 3 == 0)))
            except Exception as exc:  # noqa: BLE001 - counted below
                failures.append(exc)

    threads = [threading.Thread(target=post, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:3]
    labelled: dict[str, int] = {}
    for outcomes in results:
        for o in outcomes:
            assert o.status in ("labelled", "unchanged"), o
            labelled[o.id] = labelled.get(o.id, 0) + (o.status == "labelled")
    assert labelled and all(n == 1 for n in labelled.values()), labelled
    stored = store.get(list(labelled))
    assert all(stored[pid]["true_label"] == truth[pid] for pid in labelled)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_file_deleted_or_replaced_while_open_acknowledges_nothing_lost(tmp_path, how):
    """`rm predictions.db` (or a copy moved over it) while the server writes: the commit
    that finds the file changed is refused (not acknowledged), the store reopens at the
    path, and every later acknowledged row is in the file a reader of the path opens."""
    import os
    import shutil
    import sqlite3

    path = tmp_path / "log.db"
    store = PredictionStore(f"sqlite:///{path}").create()
    store.insert(_rows(new_ids(5)))
    if how == "deleted":
        os.remove(path)
    else:
        shutil.copy(path, tmp_path / "other.db")
        os.replace(tmp_path / "other.db", path)
    with pytest.raises(StoreUnavailable, match=f"was {how} while open"):
        store.insert(_rows(new_ids(3)))
    later = new_ids(4)
    assert store.insert(_rows(later)) == 4
    store.dispose()
    reader = sqlite3.connect(path)
    found = {r[0] for r in reader.execute("SELECT id FROM predictions")}
    assert set(later) <= found


def test_the_timer_notices_a_deleted_file_between_commits(tmp_path):
    import os

    path = tmp_path / "log.db"
    store = PredictionStore(f"sqlite:///{path}").create()
    store.insert(_rows(new_ids(2)))
    os.remove(path)
    assert store.check_file() is False  # handled: reopened, the schema is back
    assert path.exists() and store.count() == 0
    assert store.check_file() is True
    store.insert(_rows(new_ids(2)))
    assert store.count() == 2
    store.dispose()


def test_wal_checkpoints_follow_commits_and_an_idle_store_runs_none(tmp_path):
    from sqlalchemy import event

    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}")
    checkpoints = []

    def seen(statement: str) -> None:  # on whichever thread runs it, the driver's own trace
        if "wal_checkpoint" in statement:
            checkpoints.append(time.monotonic())

    @event.listens_for(store.engine, "connect")
    def traced(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(seen)

    store.create()
    stop = store.start_checkpoints(interval_s=0.05, check_s=0.2)
    try:
        time.sleep(0.6)
        assert checkpoints == []  # nothing written: no checkpoint, however long
        for _ in range(5):
            store.insert(_rows(new_ids(64)))
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while len(checkpoints) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(checkpoints) >= 2  # commits spread over 0.5 s: several small checkpoints
        settled = len(checkpoints)
        time.sleep(0.6)
        assert len(checkpoints) <= settled + 1  # and none once the commits stop
    finally:
        stop.set()
        store.dispose()


@pytest.mark.parametrize("rows, most, least", [(1, 13, 0), (256, None, 20)])
def test_small_commits_gather_for_a_checkpoint_large_ones_do_not_wait(tmp_path, rows, most, least):
    """A commit every 5 ms for 1 s: of 1-row requests (296 bytes of arrays), a checkpoint
    at most every max_interval_s (0.1 s); of 256-row ones (76 KiB, over batch_bytes),
    one every interval_s (0.01 s) as before."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}")
    checkpoints = []

    @sa.event.listens_for(store.engine, "connect")
    def traced(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(
            lambda sql: checkpoints.append(1) if "wal_checkpoint" in sql else None
        )

    store.create()
    stop = store.start_checkpoints(
        interval_s=0.01, check_s=5, max_interval_s=0.1, batch_bytes=32 * 1024
    )
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            store.insert(_rows(new_ids(rows)))
            time.sleep(0.005)
    finally:
        stop.set()
        store.dispose()
    assert len(checkpoints) >= max(least, 1)
    assert most is None or len(checkpoints) <= most


def test_workers_sharing_a_file_each_checkpoint_as_seldom_as_they_are_many(tmp_path):
    """`sharers=2` (each of two workers of one server): each waits twice as long between
    checkpoints, so the file sees about one worker's rate. Both stores take the same
    commits at the same moments (47 KiB each, over batch_bytes), faster than either
    interval (a step took 22 ms on a slow machine, where 256-row commits and a 0.01 s
    interval made both rates one a step), so the interval sets each rate."""
    counts = {1: [], 2: []}
    stores, stops = {}, []
    for sharers in counts:
        s = PredictionStore(f"sqlite:///{tmp_path / f'log{sharers}.db'}")

        @sa.event.listens_for(s.engine, "connect")
        def traced(dbapi_conn, _record, seen=counts[sharers]):
            dbapi_conn.set_trace_callback(
                lambda sql: seen.append(1) if "wal_checkpoint" in sql else None
            )

        stores[sharers] = s.create()
        stops.append(s.start_checkpoints(interval_s=0.04, check_s=5, sharers=sharers))
    try:
        end = time.monotonic() + 1.6
        while time.monotonic() < end:
            for s in stores.values():
                s.insert(_rows(new_ids(160)))
            time.sleep(0.001)
    finally:
        for stop in stops:
            stop.set()
        for s in stores.values():
            s.dispose()
    one, two = len(counts[1]), len(counts[2])
    assert one >= 10, one  # one a step: the checkpoint, then a pause of interval_s
    assert 0.3 * one <= two <= 0.75 * one, (one, two)  # about half as many


def test_sharers_below_one_are_refused(tmp_path):
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    with pytest.raises(ValueError, match="sharers"):
        store.start_checkpoints(sharers=0)
    store.dispose()


def test_a_checkpoint_that_empties_the_wal_marks_the_next_commit_as_a_restart(tmp_path):
    """The commit after a complete checkpoint starts the WAL over and syncs its header: the
    store says so (the log writer then makes that commit off the event loop)."""
    import os

    db = tmp_path / "log.db"
    store = PredictionStore(f"sqlite:///{db}").create()
    stop = store.start_checkpoints(interval_s=0.02, check_s=5)
    try:
        assert store.wal_restart_pending is False
        store.insert(_rows(new_ids(64)))
        deadline = time.monotonic() + 5
        while not store.wal_restart_pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.wal_restart_pending  # every frame was copied back to the database
        stop.set()  # no further checkpoint may set the flag again before the next assert
        wal = os.path.getsize(f"{db}-wal")
        store.insert(_rows(new_ids(4)))  # this commit restarts the WAL from its start
        assert store.wal_restart_pending is False
        assert os.path.getsize(f"{db}-wal") <= wal  # written over, not appended to
    finally:
        stop.set()
        store.dispose()


def test_shadow_answers_rollouts_and_version_figures_on_both_backends(store):
    store.insert(_rows(["a", "b", "c", "d"]))  # the champion (v1) said 3 for each
    p = encode_rows(np.full((1, 10), 0.1, np.float32))[0]
    shadow = [
        (i, "2", "m", time.time(), lbl, p) for i, lbl in zip("abcd", (3, 5, 3, 3), strict=True)
    ]
    store.insert_shadow(shadow)
    store.insert_shadow(shadow[:1])  # a resend: idempotent on (id, version)
    store.add_labels([("a", 3), ("b", 5), ("c", 7)])
    truth, cand, champ = store.shadow_pairs("m", "2", "1")
    assert sorted(zip(truth, cand, champ, strict=True)) == [(3, 3, 3), (5, 5, 3), (7, 3, 3)]
    (summary,) = store.shadow_summary("m")
    assert summary["rows"] == 4 and summary["agreement"] == 0.75 and summary["labelled"] == 3
    assert summary["champion_accuracy"] == pytest.approx(1 / 3)
    assert summary["shadow_accuracy"] == pytest.approx(2 / 3)

    seq = store.start_rollout("m", "2", "1", 0.25, "{}")
    with pytest.raises(ValueError, match="already running"):
        store.start_rollout("m", "3", "1", 0.25, "{}")
    assert store.running_rollout("m")["seq"] == seq
    store.insert(_rows(["e", "f"], version="2"))
    store.add_event("m", "2", "canary_failed", 2)
    figures = store.version_stats("m", since=0)
    assert figures["2"]["rows"] == 2 and figures["2"]["failed_rows"] == 2
    assert figures["1"]["labelled"] == 3 and figures["1"]["accuracy"] == pytest.approx(1 / 3)
    assert figures["1"]["p99_ms"] == pytest.approx(2.5)
    assert store.end_rollout(seq, "aborted", "test") is True
    assert store.end_rollout(seq, "promoted", "late") is False  # decided once
    assert store.running_rollout("m") is None
    assert store.latest_rollout("m")["state"] == "aborted"


def _generated(n, seed=0, version="1"):
    """A request as the server logs it: ids made by new_ids (one prefix, rows indexed)."""
    request = _request(range(n), seed=seed, version=version)
    request.ids = new_ids(n)
    return request


def _view_rows(store):
    return {r["id"]: r for r in store.recent(limit=10**6)}


def test_a_request_with_generated_ids_is_one_record_read_as_its_rows(store, tmp_path):
    """Requests whose ids new_ids made are kept as one record each on SQLite (the rows on
    PostgreSQL); every reader sees exactly the rows that logging them row by row gives."""
    requests = [_generated(n, seed=s) for s, n in ((1, 64), (2, 1), (3, 7))]
    client = _request(["client-a", "client-b"], seed=4)
    assert store.insert_requests([*requests, client]) == 74
    assert store.insert_requests(requests[:1]) == 0  # a retried commit adds nothing
    rows_store = PredictionStore(f"sqlite:///{tmp_path / 'rows.db'}").create()
    flat = [r for request in [*requests, client] for r in request.rows()]
    assert rows_store.insert(flat) == 74
    if store.units:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM prediction_requests").scalar() == 3
            assert conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar() == 2
    assert _view_rows(store) == _view_rows(rows_store)
    assert store.count() == 74 and store.count(labelled=True) == 0
    past_the_end = requests[0].ids[0][:-4] + "0040"  # row 64 of a 64-row request
    ids = [i for request in requests for i in request.ids] + ["client-a", "nope", past_the_end]
    assert store.get(ids) == rows_store.get(ids)
    assert len(store.get(ids)) == 73
    f, p = store.recent_arrays()
    f2, p2 = rows_store.recent_arrays()
    order, order2 = np.lexsort(f.T), np.lexsort(f2.T)
    assert np.array_equal(f[order], f2[order2]) and np.array_equal(p[order], p2[order2])
    assert store.version_stats("m", 0) == rows_store.version_stats("m", 0)

    def performance(s):
        return sorted((*r[:5], r[5].tolist()) for r in s.performance_rows("m", 0))

    assert performance(store) == performance(rows_store)
    rows_store.dispose()


def test_request_records_of_one_size_are_one_statement(tmp_path, monkeypatch):
    """A group's request records go in as one INSERT per size of request (cut every
    _UNITS_PER_STATEMENT records), in one transaction; a retried group whose records are
    partly kept already counts only the new rows, and a group of one size alone is one
    statement with no BEGIN."""
    import pipeline.store as store_module

    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    monkeypatch.setattr(store_module, "_UNITS_PER_STATEMENT", 3)
    ones = [_generated(1, seed=s) for s in range(7)]
    sixty_fours = [_generated(64, seed=10 + s) for s in range(2)]
    group = [ones[0], sixty_fours[0], *ones[1:5], sixty_fours[1]]
    assert store.insert_requests(group) == 5 + 128
    inserts = [s for s in statements if s.startswith("INSERT INTO prediction_requests")]
    # the 1-row records as 3 + 2, the 64-row ones as one statement
    assert sorted(s.count("), (") + 1 for s in inserts) == [2, 2, 3]
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"

    statements.clear()
    retried = [*ones[3:7], sixty_fours[1]]  # 2 of the 1-row records and one 64-row are kept
    assert store.insert_requests(retried) == 2
    statements.clear()
    assert store.insert_requests([_generated(1, seed=20), _generated(1, seed=21)]) == 2
    assert len(statements) == 1 and statements[0].startswith("INSERT")  # its own transaction

    rows_store = PredictionStore(f"sqlite:///{tmp_path / 'rows.db'}").create()
    everything = [*ones, *sixty_fours]
    rows_store.insert([r for request in everything for r in request.rows()])
    ids = [i for request in everything for i in request.ids]
    assert store.get(ids) == rows_store.get(ids) and len(store.get(ids)) == 7 + 128
    assert store.count() == 7 + 128 + 2
    store.dispose()
    rows_store.dispose()


@pytest.mark.parametrize("spelling", ["sqlite:///{}", "sqlite:///file:{}?uri=true"])
def test_a_label_written_between_a_readers_two_statements_is_seen_once(tmp_path, spelling):
    """A reader of both tables (`recent`, `count`) sees one snapshot: a label written by
    another process after it read `predictions` and before it read the request rows
    (which copies the row from one to the other) neither hides the row nor shows it twice.
    A database file named as an SQLite URI is a file too."""
    path = tmp_path / "log.db"
    store = PredictionStore(spelling.format(path)).create()
    other = PredictionStore(f"sqlite:///{path}")  # another process's store
    request = _generated(8, seed=3)
    store.insert_requests([request])
    pending: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def label_between(conn, cursor, statement, *args):
        # each reader reads `predictions` first: the label lands after that statement
        if "prediction_request" in statement and pending:
            assert other.add_labels([(pending.pop(), 7)])[0].status == "labelled"

    pending.append(request.ids[2])
    rows = store.recent(limit=100)
    assert sorted(r["id"] for r in rows) == sorted(request.ids) and not pending
    pending.append(request.ids[5])
    assert store.count() == 8 and not pending
    pending.append(request.ids[6])
    features, _ = store.recent_arrays()
    assert len(features) == 8 and not pending
    sa.event.remove(store.engine, "before_cursor_execute", label_between)
    assert store.count() == 8 and store.count(labelled=True) == 3
    store.dispose()
    other.dispose()


def test_an_in_memory_log_keeps_an_insert_made_while_a_reader_is_open():
    """An in-memory database gives every checkout on a thread one connection: a reader's
    transaction there would take in an insert made meanwhile and roll it back."""
    store = PredictionStore("sqlite://").create()
    store.insert(_rows(["a", "b", "c"]))
    chunks = store.labelled_chunks(-1.0, 1)  # a reader left open part-way
    store.add_labels([("a", 1)])
    next(chunks)
    assert store.insert_requests([_generated(4, seed=2)]) == 4
    assert len(store.recent()) == 7  # a reader inside another, on the same thread
    chunks.close()
    assert store.count() == 7
    store.dispose()


def test_a_label_gives_a_kept_row_its_own_record(store):
    request = _generated(64, seed=5)
    store.insert_requests([request])
    target, other = request.ids[10], request.ids[11]
    before = store.get([target])[target]
    outcomes = store.add_labels([(target, 4), (other, 9), (request.ids[0][:-4] + "ffff", 1)])
    assert [o.status for o in outcomes] == ["labelled", "labelled", "unknown_id"]
    assert store.count() == 64 and store.count(labelled=True) == 2  # shown once, labelled
    pulled = {r["id"]: r for r in store.labelled_since(0)}
    assert set(pulled) == {target, other}
    assert pulled[target]["features"] == before["features"]
    assert pulled[target]["true_label"] == 4 and pulled[target]["label"] == before["label"]
    assert store.add_labels([(target, 4)])[0].status == "unchanged"
    assert store.add_labels([(target, 5)])[0].status == "conflict"
    waiting = {r["id"] for r in store.unlabelled("m")}
    assert len(waiting) == 62 and target not in waiting
    assert _view_rows(store)[target]["true_label"] == 4
    # a label outside the classes of the model that made the prediction (10 outputs)
    assert store.add_labels([(request.ids[12], 10)])[0].status == "invalid_label"


def test_a_failed_label_request_keeps_the_kept_rows_readable(store):
    request = _generated(3, seed=6)
    store.insert_requests([request])
    assert store.add_labels([(request.ids[0], 1)])[0].status == "labelled"
    outcomes = store.add_labels([(request.ids[0], 2), (request.ids[1], 3)])  # one conflict
    assert {o.status for o in outcomes} >= {"conflict"}
    assert store.count() == 3 and store.count(labelled=True) == 1
    assert store.get([request.ids[1]])[request.ids[1]]["true_label"] is None


def test_a_client_sending_back_server_ids_logs_nothing_twice(store):
    """Ids the server made, sent back as a client's own (a retry by a client that kept
    them), name rows already logged: those rows are skipped, the first ones stay."""
    first = _generated(3, seed=7, version="1")
    assert store.insert_requests([first]) == 3
    retry = _request([*first.ids, "client-new"], seed=8, version="2")
    assert store.insert_requests([retry]) == 1  # only the id never seen before
    assert store.count() == 4
    assert {r["model_version"] for r in store.get(first.ids).values()} == {"1"}
    # both in one commit group: the request's record goes in first, the retry's rows
    # that name it are skipped
    again, echo = _generated(2, seed=9), None
    echo = _request([again.ids[1], "client-other"], seed=10, version="3")
    assert store.insert_requests([again, echo]) == 3
    assert store.get([again.ids[1]])[again.ids[1]]["model_version"] == "1"
    assert store.count() == 7


def test_a_label_request_that_applies_nothing_writes_nothing(store):
    request = _generated(6, seed=11)
    store.insert_requests([request])

    def records() -> int:
        with store.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar()

    copied = records() + (1 if store.units else 0)  # PostgreSQL keeps rows all along
    assert store.add_labels([(request.ids[0], 1)])[0].status == "labelled"
    assert records() == copied
    refused = store.add_labels([(request.ids[0], 2), (request.ids[1], 3)])  # a conflict
    assert "conflict" in {o.status for o in refused}
    assert store.add_labels([(request.ids[2], 99)])[0].status == "invalid_label"
    assert records() == copied and store.count() == 6


def test_readers_walk_the_request_index_in_order_up_to_the_limit(store):
    """The newest rows come from both kinds of record, merged by time, and the request
    rows' query stops at the limit (no sort of everything since `since`)."""
    import sqlalchemy as sa

    from pipeline.store import request_rows

    older = _request(["c-0", "c-1"], seed=12)
    older.created_at -= 10
    newer = _generated(3, seed=13)
    newest = _request(["c-2"], seed=14)
    newest.created_at += 10
    store.insert_requests([older, newer, newest])
    assert [r["id"] for r in store.recent(limit=4)] == ["c-0", "c-1", *newer.ids[:2]]
    waiting = store.unlabelled("m", limit=2)
    assert [r["id"] for r in waiting] == ["c-2", newer.ids[0]]  # newest first, ties by store
    assert store.version_stats("m", 0, limit=3)["1"]["rows"] == 3
    f, _ = store.recent_arrays(limit=3)
    assert np.array_equal(f, np.vstack([older.features, newer.features[:1]]))
    if store.units:
        t = request_rows
        stmt = sa.select(t).where(t.c.created_at > 0).order_by(t.c.created_at).limit(10)
        sql = str(stmt.compile(store.engine, compile_kwargs={"literal_binds": True}))
        with store.engine.connect() as conn:
            plan = " ".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        assert "ix_prediction_requests_created_at" in plan and "TEMP B-TREE" not in plan


def test_requests_are_kept_whole_without_sqlite_338_statements(tmp_path, monkeypatch):
    """An SQLite older than 3.38 (no `->>`) logs client-id requests as rows, and still
    keeps and reads the server's requests as records (json_each is older)."""
    import pipeline.store as store_module

    monkeypatch.setattr(store_module, "REQUEST_STATEMENTS", False)
    store = PredictionStore(f"sqlite:///{tmp_path / 'old.db'}").create()
    request = _generated(4, seed=15)
    assert store.insert_requests([request, _request(["c-9"], seed=16)]) == 5
    assert store.count() == 5 and len(store.get(request.ids)) == 4
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM prediction_requests").scalar() == 1
    assert store.add_labels([(request.ids[2], 1)])[0].status == "labelled"
    assert [r["id"] for r in store.labelled_since(0)] == [request.ids[2]]
    store.dispose()


def test_client_ids_shaped_like_the_servers_commit_beside_another_writer(tmp_path):
    """A group whose client ids look like the server's reads the request records before
    it writes: beside another writer on the file (a second worker) it must take the write
    lock first, or SQLite refuses to turn its read into a write (`database is locked`)."""
    import threading

    url = f"sqlite:///{tmp_path / 'two.db'}"
    mine, theirs = PredictionStore(url).create(), PredictionStore(url)
    stop, errors = threading.Event(), []

    def other_worker() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            theirs.insert_requests([_generated(2, seed=k)])

    thread = threading.Thread(target=other_worker)
    thread.start()
    try:
        for k in range(400):
            try:
                mine.insert_requests([_request([uuid.uuid4().hex for _ in range(4)], seed=k)])
            except StoreUnavailable as exc:
                errors.append(str(exc))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert mine.count() >= 1600
    mine.dispose()
    theirs.dispose()


@pytest.mark.parametrize(
    "url, expected",
    [
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file::memory:?cache=shared&uri=true", None),
        ("sqlite:///file:x.db?mode=memory&uri=true", None),
        ("sqlite:///log.db", "log.db"),
        ("sqlite:///file:log.db", "file:log.db"),  # not a URI without uri=true: a name
        ("sqlite:///file:my%20log.db?mode=rwc&uri=true", "my log.db"),
        ("sqlite:///file:///abs/log.db?uri=true", "/abs/log.db"),
    ],
)
def test_the_file_an_sqlite_url_opens(url, expected, tmp_path, monkeypatch):
    """The file a store watches and reads in one transaction; none for memory (there a
    reader's BEGIN would roll back an insert, see above)."""
    from pipeline.store import _sqlite_file

    monkeypatch.chdir(tmp_path)
    found = _sqlite_file(sa.engine.make_url(url))
    assert found == (None if expected is None else str(tmp_path / expected))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 63, 64, 784])
def test_whole_numbers_0_to_255_are_logged_one_byte_a_value_and_read_back_exactly(k):
    """Pixels, counts and codes are kept one byte a value (with a 1-2 byte trailer that
    makes the row's length no multiple of 4, as a float32 row's always is); every reader
    gets the same float32 values as from float32 blobs."""
    n = -(-BYTE_ROWS_FROM // k)  # rows enough for the array to be tried
    x = np.random.default_rng(k).integers(0, 256, (n, k)).astype(np.float32)
    x[0, 0], x[-1, -1] = 0, 255
    blob, width = encode_features(x)
    assert width % 4 != 0 and k < width <= k + 2 and len(blob) == n * width
    table = np.frombuffer(blob, np.uint8).reshape(n, width)
    assert np.array_equal(table[:, :k], x) and (table[:, -1] == width - k).all()
    assert not table[:, k:-1].any()  # the trailer: zeros, then its own length
    rows = encode_feature_rows(x)
    assert len(rows) == n and {len(r) for r in rows} == {width}
    got = decode_rows(rows)
    assert got.dtype == np.float32 and got.tobytes() == x.tobytes()
    assert decode_array(rows[-1]).tobytes() == x[-1].tobytes()


@pytest.mark.parametrize("odd", [0.5, -0.0, -1.0, 256.0, np.nan, np.inf, 1e-45])
def test_any_other_value_keeps_the_request_in_float32_bit_for_bit(odd):
    x = np.random.default_rng(1).integers(0, 256, (32, 64)).astype(np.float32)
    x[7, 9] = odd
    blob, width = encode_features(x)
    assert width == 256 and blob == x.tobytes()
    assert decode_rows(encode_feature_rows(x)).tobytes() == x.tobytes()  # NaN, -0.0 too


def test_small_arrays_stay_float32_and_mixed_encodings_read_in_order():
    small = np.arange(BYTE_ROWS_FROM - 1, dtype=np.float32).reshape(1, -1) % 256
    assert encode_features(small)[1] == small.size * 4  # under a page: not worth the check
    whole = np.full((20, 64), 7, np.float32)
    floats = np.full((3, 64), 0.25, np.float32)
    rows = encode_feature_rows(whole)[:2] + encode_rows(floats) + encode_feature_rows(whole)[2:]
    got = decode_rows(rows)
    assert np.array_equal(got, np.concatenate([whole[:2], floats, whole[2:]]))
    assert decode_rows([]).shape == (0, 0)


@pytest.mark.parametrize(
    "blobs, match",
    [
        ([bytes(64) + b"\x03"], "neither float32 nor byte values"),  # a trailer of 3
        ([bytes(65) + b"\x02"], "neither float32 nor byte values"),  # 2 where 1 is due
        ([bytes(64) + b"\x01", bytes(4 * 63)], "different lengths"),
        # rows of 64 and 63 values are both 65 bytes: told apart by the trailer
        ([bytes(64) + b"\x01", bytes(63) + b"\x00\x02"], r"different lengths: \[63, 64\]"),
    ],
)
def test_bytes_no_encoder_wrote_are_refused(blobs, match):
    with pytest.raises(ValueError, match=match):
        decode_rows(blobs)
    if len(blobs) == 1:
        with pytest.raises(ValueError, match=match):
            decode_array(blobs[0])


def test_a_logged_pixel_request_is_smaller_on_disk_and_every_reader_gets_its_values(store):
    """The server's 64 x 64 pixel request through the log: its record (SQLite) or rows
    (PostgreSQL) hold 65 bytes a row, and `get`, the view, the drift check's arrays, the
    feedback pull and a label's own record all give back its float32 values exactly."""
    pixels = np.random.default_rng(3).integers(0, 17, (64, 64)).astype(np.float32)
    request = _generated(64, seed=3)
    request.features = pixels
    floats = _generated(64, seed=4)  # normal floats: float32 as before
    assert store.insert_requests([request, floats]) == 128
    table = "prediction_requests" if store.units else "predictions"
    with store.engine.connect() as conn:
        sizes = conn.exec_driver_sql(f"SELECT length(features) FROM {table}").scalars().all()
    assert sorted(set(sizes)) == ([64 * 65, 64 * 256] if store.units else [65, 256])
    assert store.recent(limit=1)[0]["features"] in (pixels[0].tolist(), floats.features[0].tolist())
    got = store.get([*request.ids, *floats.ids])
    assert [got[i]["features"] for i in request.ids] == pixels.tolist()
    assert got[floats.ids[5]]["features"] == floats.features[5].tolist()
    f, _ = store.recent_arrays()
    assert f.dtype == np.float32 and f.shape == (128, 64)
    assert {r.tobytes() for r in f} == {r.tobytes() for r in [*pixels, *floats.features]}
    store.add_labels([(pid, 1) for pid in request.ids[:5]] + [(floats.ids[0], 2)])
    pulled = {r["id"]: r for r in store.labelled_since(0)}
    assert [pulled[i]["features"] for i in request.ids[:5]] == pixels[:5].tolist()
    assert pulled[floats.ids[0]]["features"] == floats.features[0].tolist()
    schema = Schema(tuple(f"pixel{i}" for i in range(64)), 10)
    chunk = next(store.labelled_chunks(0, 100))
    frame = _rows_to_frame(chunk, schema)
    assert frame.shape == (6, 66)
    by_id = dict(zip(frame["id"], frame.iloc[:, 2:].to_numpy(np.float32), strict=True))
    assert by_id[request.ids[3]].tobytes() == pixels[3].tobytes()
    assert by_id[floats.ids[0]].tobytes() == floats.features[0].tobytes()


def test_byte_rows_with_a_two_byte_trailer_and_client_ids_through_the_log(store):
    """63 values a row (a 2-byte trailer) through both SQLite statements (a request of the
    server's ids, one of a client's that SQLite cuts into rows) and PostgreSQL's rows."""
    counts = np.random.default_rng(5).integers(0, 256, (20, 63)).astype(np.float32)
    server = _generated(20, seed=5)
    server.features = counts
    client = _request([f"client-{i}" for i in range(20)], seed=6)
    client.features = counts[::-1].copy()
    assert encode_features(counts)[1] == 65
    assert store.insert_requests([server, client]) == 40
    got = store.get([*server.ids, *client.ids])
    assert [got[i]["features"] for i in server.ids] == counts.tolist()
    assert [got[i]["features"] for i in client.ids] == counts[::-1].tolist()
    f, _ = store.recent_arrays()
    assert f.shape == (40, 63)
    assert sorted(r.tobytes() for r in f) == sorted(r.tobytes() for r in [*counts, *counts])


def test_the_drift_read_takes_the_rows_of_one_shape(store):
    """A log holding rows of a 10-class and a 3-class model (the classes changed between
    data versions), of 64 float and 64 byte features and of 12 features: read for one
    shape it returns exactly those rows, in time order; read for none it says why."""
    rng = np.random.default_rng(3)
    t0 = time.time()

    def req(n, k, c, pixels, at):
        x = rng.integers(0, 17, (n, k)) if pixels else rng.normal(size=(n, k))
        p = rng.random((n, c))
        return LoggedRequest(new_ids(n), t0 + at, "m", "1", x.astype(np.float32),
                             [0] * n, p.astype(np.float32), 1.0)  # fmt: skip

    wanted = [req(64, 64, 10, True, 1), req(3, 64, 10, False, 3), req(20, 64, 10, True, 5)]
    # 63 byte values are 65 bytes long with their trailer, as 64 are: told apart by it
    others = [req(64, 64, 3, True, 2), req(5, 12, 10, False, 4), req(2, 64, 3, False, 6),
              req(20, 63, 10, True, 7), req(20, 62, 10, True, 8)]  # fmt: skip
    assert len(encode_feature_rows(others[3].features)[0]) == 65
    assert len(encode_feature_rows(others[4].features)[0]) == 63
    store.insert_requests(wanted + others)
    assert store.logged_since(t0) == 87 + 64 + 5 + 2 + 40
    assert store.logged_since(t0 + 6.5) == 40
    f, p = store.recent_arrays(features=64, classes=10)
    assert f.shape == (87, 64) and p.shape == (87, 10)
    assert store.recent_arrays(features=63, classes=10)[0].shape == (20, 63)
    assert store.recent_arrays(features=62, classes=10)[0].shape == (20, 62)
    np.testing.assert_array_equal(f, np.concatenate([r.features for r in wanted]))
    np.testing.assert_array_equal(p, np.concatenate([r.probabilities for r in wanted]))
    assert store.recent_arrays(features=64, classes=3)[1].shape == (66, 3)
    assert store.recent_arrays(features=12)[0].shape == (5, 12)
    with pytest.raises(ValueError, match="different lengths"):
        store.recent_arrays()
