"""The feedback pull at volume: the log read in chunks gives the same feedback as one read,
on SQLite and on a real PostgreSQL, with memory bounded by the chunk."""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from pipeline.feedback import FEEDBACK, LATENESS_S, STATE, pull_feedback, read_state
from pipeline.store import (
    LoggedRequest,
    PredictionStore,
    decode_rows,
    encode_rows,
    labelled_query,
    new_ids,
)
from pipeline.validate import Schema

SCHEMA = Schema(tuple(f"pixel{i}" for i in range(64)), 10)
N, CHUNK = 2_500, 100  # 25 chunks
ONE_READ = 10**9  # a chunk larger than the log: the whole pull in one query, as before


@pytest.fixture
def store(store_on_both):
    return store_on_both


def _log(store: PredictionStore, ids: list[str], seed: int = 0) -> np.ndarray:
    x = (np.random.default_rng(seed).random((len(ids), 64)) * 16).astype(np.float32)
    probs = np.full((len(ids), 10), 0.1, np.float32)
    t0 = time.time()  # distinct times: `recent` orders by them
    rows = [
        (i, t0 + k * 1e-4, "m", "1", f, 3, p, 1.0)
        for k, (i, f, p) in enumerate(zip(ids, encode_rows(x), encode_rows(probs), strict=True))
    ]
    for k in range(0, len(rows), 1000):
        store.insert(rows[k : k + 1000])
    return x


def _label(store: PredictionStore, labels: list[tuple[str, int]], overwrite=False) -> None:
    for k in range(0, len(labels), 300):  # several calls: several labelled_at values
        store.add_labels(labels[k : k + 300], overwrite=overwrite)


def _one_read(store: PredictionStore, after: float = -1.0) -> pd.DataFrame:
    """The labelled rows since `after`, in pull order, from one pandas.read_sql."""
    with store.engine.connect() as conn:
        found = pd.read_sql(labelled_query(after), conn)
    x = decode_rows(found["features"].tolist())
    frame = pd.DataFrame(x, columns=list(SCHEMA.feature_names))
    frame.insert(0, "label", found["true_label"].astype("int64"))
    frame.insert(0, "id", found["id"].astype(str))
    return frame


def _pull(store, tmp_path, name: str, chunk_rows: int):
    return pull_feedback(store, tmp_path / name / "loop", SCHEMA, tmp_path / name / "q", chunk_rows)


def _feedback(tmp_path, name: str) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / name / "loop" / FEEDBACK)


def test_chunked_pull_equals_one_read_through_relabels_and_repeats(store, tmp_path):
    ids = [f"p{i:05d}" for i in range(N)]
    _log(store, ids)
    labelled = [i for k, i in enumerate(ids) if k % 10 != 3]  # a tenth stays unlabelled
    _label(store, [(i, k % 10) for k, i in enumerate(labelled)])

    chunked = _pull(store, tmp_path, "chunked", CHUNK)
    whole = _pull(store, tmp_path, "whole", ONE_READ)
    expected = _one_read(store)
    assert (chunked.pulled, chunked.new, chunked.total_feedback) == (len(labelled),) * 3
    assert whole == chunked
    pd.testing.assert_frame_equal(_feedback(tmp_path, "chunked"), expected)
    pd.testing.assert_frame_equal(_feedback(tmp_path, "whole"), expected)
    row_groups = pq.ParquetFile(tmp_path / "chunked" / "loop" / FEEDBACK).num_row_groups
    assert row_groups == math.ceil(len(labelled) / CHUNK)  # one row group per chunk

    # re-labels spread over the earlier chunks, first labels for some unlabelled rows
    time.sleep(0.01)
    relabelled = labelled[::97]
    _label(store, [(i, 9) for i in relabelled], overwrite=True)
    newcomers = [i for k, i in enumerate(ids) if k % 10 == 3][:150]
    _label(store, [(i, 5) for i in newcomers])
    second = _pull(store, tmp_path, "chunked", CHUNK)
    assert second == _pull(store, tmp_path, "whole", ONE_READ)
    was_9 = {i for k, i in enumerate(labelled) if k % 10 == 9}
    assert second.new == len(set(relabelled) - was_9) + len(newcomers)
    assert second.total_feedback == len(labelled) + len(newcomers)

    # each id once, with its newest label: the old rows that came again (re-labelled, or
    # sharing the watermark) make way for the rows of this pull, in the order of the log
    pulled = _one_read(store, chunked.watermark - LATENESS_S)
    assert len(pulled) > len(relabelled) - len(was_9) + len(newcomers)  # some at the mark
    kept = expected[~expected["id"].isin(set(pulled["id"]))]
    expected = pd.concat([kept, pulled], ignore_index=True)
    got = _feedback(tmp_path, "chunked")
    assert got["id"].is_unique
    pd.testing.assert_frame_equal(got, expected)
    pd.testing.assert_frame_equal(_feedback(tmp_path, "whole"), expected)
    assert set(got.loc[got["id"].isin(relabelled), "label"]) == {9}

    before = (tmp_path / "chunked" / "loop" / FEEDBACK).read_bytes()
    third = _pull(store, tmp_path, "chunked", CHUNK)
    assert third.new == 0 and third.total_feedback == second.total_feedback
    assert (tmp_path / "chunked" / "loop" / FEEDBACK).read_bytes() == before


def test_the_log_is_read_in_chunks_of_at_most_chunk_rows(store, tmp_path, monkeypatch):
    ids = [f"p{i:05d}" for i in range(N)]
    _log(store, ids)
    _label(store, [(i, 1) for i in ids])
    sizes: list[int] = []
    server_side: list[bool] = []
    read = store.labelled_chunks

    def spy(after, chunk_rows):
        for part in read(after, chunk_rows):
            sizes.append(len(part))
            yield part

    def cursor_kind(conn, cursor, statement, parameters, context, executemany):
        if "FROM predictions" in statement and "true_label IS NOT NULL" in statement:
            server_side.append(type(cursor).__name__ == "ServerCursor")

    monkeypatch.setattr(store, "labelled_chunks", spy)
    sa.event.listen(store.engine, "before_cursor_execute", cursor_kind)
    _pull(store, tmp_path, "a", CHUNK)
    assert sizes == [CHUNK] * (N // CHUNK)
    if store.dialect == "postgresql":  # a named cursor: the server holds the rest
        assert server_side == [True]


def test_memory_is_bounded_by_the_chunk_not_the_log(tmp_path):
    """Python-side peak (tracemalloc) of a pull of 3,000 rows: chunked, about that of one
    chunk and the ids; in one read, every row of the log at once."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    ids = [f"p{i:05d}" for i in range(3000)]
    _log(store, ids)
    _label(store, [(i, 2) for i in ids])

    def peak(name: str, chunk_rows: int) -> int:
        tracemalloc.start()
        try:
            _pull(store, tmp_path, name, chunk_rows)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _pull(store, tmp_path, "warm-up", CHUNK)  # imports and caches, outside the measure
    chunked, whole = peak("chunked", CHUNK), peak("whole", ONE_READ)
    store.dispose()
    pd.testing.assert_frame_equal(_feedback(tmp_path, "chunked"), _feedback(tmp_path, "whole"))
    assert chunked < whole / 3, (chunked, whole)


def test_bad_rows_in_several_chunks_are_all_quarantined(tmp_path):
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    ids = [f"p{i:04d}" for i in range(450)]
    x = np.ones((450, 64), np.float32)
    bad = [5, 120, 121, 330]  # in chunks 1, 2 and 4
    x[bad, 7] = np.inf
    store.insert(
        [
            (i, time.time(), "m", "1", f, 3, p, 1.0)
            for i, f, p in zip(
                ids, encode_rows(x), encode_rows(np.full((450, 10), 0.1)), strict=True
            )
        ]
    )
    store.add_labels([(i, 4) for i in ids])
    report = _pull(store, tmp_path, "a", CHUNK)
    store.dispose()
    assert (report.pulled, report.quarantined, report.new) == (450, 4, 446)
    quarantined = pd.read_csv(tmp_path / "a" / "q" / "feedback.csv")
    assert quarantined["id"].tolist() == [ids[k] for k in bad]
    assert quarantined["reason"].str.startswith("non-finite").all()
    assert not set(_feedback(tmp_path, "a")["id"]) & set(quarantined["id"])


def test_a_pull_that_fails_midway_changes_nothing(tmp_path, monkeypatch):
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    ids = [f"p{i:04d}" for i in range(1000)]
    _log(store, ids)
    _label(store, [(i, 3) for i in ids[:400]])
    _pull(store, tmp_path, "a", CHUNK)
    loop = tmp_path / "a" / "loop"
    before = {p.name: p.read_bytes() for p in loop.iterdir()}
    _label(store, [(i, 3) for i in ids[400:]])
    read = store.labelled_chunks

    def failing(after, chunk_rows):
        for n, part in enumerate(read(after, chunk_rows)):
            if n == 3:
                raise ConnectionError("the database went away")
            yield part

    monkeypatch.setattr(store, "labelled_chunks", failing)
    with pytest.raises(ConnectionError):
        _pull(store, tmp_path, "a", CHUNK)
    assert {p.name: p.read_bytes() for p in loop.iterdir()} == before  # no temp files either
    monkeypatch.undo()
    report = _pull(store, tmp_path, "a", CHUNK)  # the next pull takes everything
    store.dispose()
    assert (report.new, report.total_feedback) == (600, 1000)
    assert read_state(loop)["pulls"] == 2 and (loop / STATE).exists()


def test_the_drift_checks_read_is_chunked_and_equals_the_rows_read(store, monkeypatch):
    """The monitor's reads: the logged inputs (as float32 arrays, in chunks) and the count
    of new labels (without reading the rows) agree with the row-by-row reads."""
    ids = [f"p{i:05d}" for i in range(N)]
    x = _log(store, ids)
    _label(store, [(i, 1) for i in ids[:700]])
    sizes: list[int] = []
    chunks = store._decoded_chunks

    def spy(stmt, chunk_rows, conn):
        for part in chunks(stmt, chunk_rows, conn):
            sizes.append(len(part[0]))
            yield part

    monkeypatch.setattr(store, "_decoded_chunks", spy)
    features, probabilities = store.recent_arrays(0.0, limit=2_000, chunk_rows=CHUNK)
    assert sizes == [CHUNK] * 20
    logged = store.recent(0.0, limit=2_000)
    np.testing.assert_array_equal(features, np.asarray([r["features"] for r in logged]))
    np.testing.assert_array_equal(features, x[:2_000])
    assert probabilities.shape == (2_000, 10) and features.dtype == np.float32
    assert store.recent_arrays(time.time() + 60)[0].shape[0] == 0
    mark = store.labelled_since(0)[400]["labelled_at"]
    assert store.count_labelled_since(mark) == len(store.labelled_since(mark)) > 0


def test_the_drift_read_merges_both_tables_into_its_output_as_it_reads(tmp_path):
    """SQLite keeps the server's requests as records and other rows as rows: the drift
    check's read merges the two by time (ties among them included) into the rows `recent`
    gives, chunk by chunk, holding little more than its output. Each table here has more
    rows than the limit; reading each whole before merging held three times the output."""
    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    assert store.units
    rng = np.random.default_rng(5)
    t0, requests = time.time(), []
    for k in range(60):  # requests of 64 generated ids and of 48 client ids, interleaved
        for n, ids in ((64, new_ids(64)), (48, [f"c{k:03d}-{j:02d}" for j in range(48)])):
            x = (rng.random((n, 64)) * 16).astype(np.float32)
            p = rng.random((n, 10)).astype(np.float32)
            # every third pair at one time: rows of both tables tie
            at = t0 + k * 1e-3 + (0 if k % 3 == 0 else n * 1e-6)
            requests.append(LoggedRequest(ids, at, "m", "1", x, [0] * n, p, 1.0))
    assert store.insert_requests(requests) == 60 * 112
    for limit in (6_720, 2_001, 700, 1):
        f, p = store.recent_arrays(0.0, limit=limit, chunk_rows=CHUNK)
        rows = store.recent(0.0, limit=limit)
        np.testing.assert_array_equal(f, np.asarray([r["features"] for r in rows]))
        np.testing.assert_array_equal(p, np.asarray([r["probabilities"] for r in rows]))
    assert store.recent_arrays(t0 + 1e-3 * 29.5)[0].shape == (30 * 112, 64)

    limit = 2_500  # under each table's rows (3,840 and 2,880)
    store.recent_arrays(0.0, limit=limit, chunk_rows=CHUNK)  # imports, outside the measure
    tracemalloc.start()
    try:
        f, p = store.recent_arrays(0.0, limit=limit, chunk_rows=CHUNK)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    store.dispose()
    assert f.shape == (limit, 64)
    assert peak < 1.6 * (f.nbytes + p.nbytes), (peak, f.nbytes + p.nbytes)


def test_a_feedback_file_written_before_is_merged_chunk_by_chunk(tmp_path):
    """A file from the former pull (one row group, ids as `string`) is read in chunks and
    merged as before: its rows first, less those pulled again, then the pull."""
    import pyarrow as pa

    store = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    ids = [f"p{i:04d}" for i in range(600)]
    _log(store, ids)
    _label(store, [(i, 1) for i in ids[:450]])
    old = _one_read(store)
    loop = tmp_path / "a" / "loop"
    loop.mkdir(parents=True)
    table = pa.Table.from_pandas(old, preserve_index=False)
    pq.write_table(table.cast(table.schema.set(0, pa.field("id", pa.string()))), loop / FEEDBACK)
    mark = max(r["labelled_at"] for r in store.labelled_since(0))  # as that pull left it
    (loop / STATE).write_text(f'{{"watermark": {mark!r}, "pulls": 1}}')
    time.sleep(0.01)
    _label(store, [(i, 6) for i in ids[100:130]], overwrite=True)
    _label(store, [(i, 2) for i in ids[450:]])
    report = _pull(store, tmp_path, "a", CHUNK)
    pulled = _one_read(store, mark - LATENESS_S)  # the re-labelled, the new, those read again
    store.dispose()
    assert (report.pulled, report.new, report.total_feedback) == (len(pulled), 30 + 150, 600)
    expected = pd.concat([old[~old["id"].isin(set(pulled["id"]))], pulled], ignore_index=True)
    pd.testing.assert_frame_equal(_feedback(tmp_path, "a"), expected)
