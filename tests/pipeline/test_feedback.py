"""Feedback pull: only labelled rows, de-duplicated, watermarked, safe when run twice at once."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pandas as pd
import pytest

from pipeline.feedback import (
    FEEDBACK,
    STATE,
    pull_feedback,
    read_state,
    training_frames,
    unpulled_labels,
)
from pipeline.store import PredictionStore, encode_rows, predictions
from pipeline.validate import Schema

SCHEMA = Schema(tuple(f"pixel{i}" for i in range(64)), 10)


@pytest.fixture
def store(tmp_path) -> PredictionStore:
    s = PredictionStore(f"sqlite:///{tmp_path / 'log.db'}").create()
    yield s
    s.dispose()


def _log(store: PredictionStore, ids: list[str], features: np.ndarray | None = None) -> None:
    x = (
        features
        if features is not None
        else np.random.default_rng(0).random((len(ids), 64), dtype=np.float32) * 16
    )
    probs = np.full((len(ids), 10), 0.1, np.float32)
    store.insert(
        [
            (i, time.time(), "m", "1", f, 3, p, 1.0)
            for i, f, p in zip(ids, encode_rows(x), encode_rows(probs), strict=True)
        ]
    )


def test_only_labelled_rows_come_back_with_the_true_label(store, tmp_path):
    _log(store, ["a", "b", "c"])
    store.add_labels([("a", 7), ("c", 1)])
    report = pull_feedback(store, tmp_path / "loop", SCHEMA, tmp_path / "q")
    assert (report.pulled, report.new, report.total_feedback) == (2, 2, 2)
    frame = pd.read_parquet(tmp_path / "loop" / FEEDBACK)
    assert dict(zip(frame["id"], frame["label"], strict=True)) == {"a": 7, "c": 1}
    # the model predicted 3 for every row: never what comes back as the label
    assert 3 not in set(frame["label"])


def test_second_pull_adds_nothing_and_new_labels_are_added(store, tmp_path):
    loop = tmp_path / "loop"
    _log(store, ["a", "b"])
    store.add_labels([("a", 1)])
    first = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    before = (loop / FEEDBACK).read_bytes()
    second = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert second.new == 0 and (loop / FEEDBACK).read_bytes() == before
    assert read_state(loop)["watermark"] == first.watermark
    store.add_labels([("b", 2)])
    third = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert third.new == 1 and third.total_feedback == 2


def test_a_label_committed_after_a_pull_that_read_past_its_stamp_is_pulled_next(store, tmp_path):
    """labelled_at is stamped before the commit: a slow transaction's label can become
    visible only after a pull has read newer labels and moved the watermark past it."""
    loop = tmp_path / "loop"
    _log(store, ["a", "slow"])
    stamped = time.time()  # the slow request stamps its label ...
    time.sleep(0.01)
    store.add_labels([("a", 1)])  # ... a quicker one commits a newer label
    first = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert first.new == 1 and first.watermark > stamped
    with store.engine.begin() as conn:  # ... and the slow one commits now
        conn.execute(
            predictions.update()
            .where(predictions.c.id == "slow")
            .values(true_label=2, labelled_at=stamped)
        )
    second = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    frame = pd.read_parquet(loop / FEEDBACK)
    assert second.new == 1 and dict(zip(frame["id"], frame["label"], strict=True)) == {
        "a": 1,
        "slow": 2,
    }
    third = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert third.new == 0 and third.total_feedback == 2


def _label_at(store: PredictionStore, pid: str, label: int, stamped: float) -> None:
    """A label committed now with an older stamp (a slow transaction's)."""
    with store.engine.begin() as conn:
        conn.execute(
            predictions.update()
            .where(predictions.c.id == pid)
            .values(true_label=label, labelled_at=stamped)
        )


def test_the_retrain_count_includes_a_label_committed_after_a_pull_read_past_it(store, tmp_path):
    """The count the retrain trigger reads (`unpulled_labels`) is what the next pull adds:
    a late label stamped before the watermark counts, the window's rows pulled already
    do not."""
    loop = tmp_path / "loop"
    _log(store, ["a", "b", "slow", "late2", "c"])
    stamped = time.time()
    time.sleep(0.01)
    store.add_labels([("a", 1), ("b", 2)])
    assert unpulled_labels(store, loop) == 2  # before any pull: every label
    first = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert first.new == 2 and read_state(loop)["window_rows"] == 2
    assert unpulled_labels(store, loop) == 0  # a and b are in the window, pulled
    _label_at(store, "slow", 3, stamped)  # committed after the pull, stamped before
    assert store.count_labelled_since(first.watermark) == 0  # what the count used to be
    assert unpulled_labels(store, loop) == 1
    _label_at(store, "late2", 4, stamped)
    store.add_labels([("c", 5)])  # and one after the watermark
    assert unpulled_labels(store, loop) == 3
    second = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert second.new == 3
    assert unpulled_labels(store, loop) == 0


def test_the_retrain_count_after_a_relabel_in_the_window(store, tmp_path):
    loop = tmp_path / "loop"
    _log(store, ["a", "b"])
    store.add_labels([("a", 1), ("b", 2)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    store.add_labels([("a", 7)], overwrite=True)  # leaves the window for after the mark
    assert unpulled_labels(store, loop) == 1
    assert pull_feedback(store, loop, SCHEMA, tmp_path / "q").new == 1
    assert unpulled_labels(store, loop) == 0


def test_the_retrain_count_is_exact_where_a_relabel_and_a_late_label_meet_in_the_window(
    store, tmp_path
):
    """The pull keeps the window's ids and stamps: a row of it labelled again since (now
    after the watermark) no longer hides a late label, and a late-committed relabel of a
    row of it (its stamp still in the window) counts; each is what the next pull adds."""
    loop = tmp_path / "loop"
    _log(store, ["a", "b", "slow", "c"])
    stamped = time.time()
    time.sleep(0.01)
    store.add_labels([("a", 1), ("b", 2)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert sorted(pid for pid, _ in read_state(loop)["window"]) == ["a", "b"]
    store.add_labels([("a", 7)], overwrite=True)  # out of the window, after the mark
    _label_at(store, "slow", 3, stamped)  # a late label in the window
    assert unpulled_labels(store, loop) == 2  # the count alone made it 1
    assert pull_feedback(store, loop, SCHEMA, tmp_path / "q").new == 2
    assert unpulled_labels(store, loop) == 0
    window = dict(read_state(loop)["window"])
    _label_at(store, "b", 6, window["b"] - 0.001)  # a relabel committed late, in the window
    assert unpulled_labels(store, loop) == 1  # the count alone made it 0
    assert pull_feedback(store, loop, SCHEMA, tmp_path / "q").new == 1
    assert unpulled_labels(store, loop) == 0


def test_a_window_over_the_ids_kept_is_counted_by_its_rows(store, tmp_path, monkeypatch):
    from pipeline import feedback

    monkeypatch.setattr(feedback, "WINDOW_IDS", 2)
    loop = tmp_path / "loop"
    _log(store, ["a", "b", "c", "slow"])
    stamped = time.time()
    time.sleep(0.01)
    store.add_labels([("a", 1), ("b", 2), ("c", 3)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    state = read_state(loop)
    assert state["window"] is None and state["window_rows"] == 3
    assert unpulled_labels(store, loop) == 0
    _label_at(store, "slow", 3, stamped)
    assert unpulled_labels(store, loop) == 1


def test_a_state_from_before_the_window_counts_after_the_watermark_only(store, tmp_path):
    loop = tmp_path / "loop"
    _log(store, ["a", "slow"])
    stamped = time.time()
    time.sleep(0.01)
    store.add_labels([("a", 1)])
    first = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    state = read_state(loop)
    del state["window_rows"], state["window"]  # as an older release wrote it
    (loop / STATE).write_text(json.dumps(state))
    _label_at(store, "slow", 3, stamped)
    assert unpulled_labels(store, loop) == 0  # not the whole window (1) counted as late
    assert pull_feedback(store, loop, SCHEMA, tmp_path / "q").new == 1
    assert read_state(loop)["window_rows"] == 2 and first.new == 1


def test_relabelled_id_keeps_one_row_with_the_newest_label(store, tmp_path):
    loop = tmp_path / "loop"
    _log(store, ["a"])
    store.add_labels([("a", 1)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    time.sleep(0.01)
    store.add_labels([("a", 2)], overwrite=True)
    report = pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    frame = pd.read_parquet(loop / FEEDBACK)
    assert report.new == 1 and frame["id"].tolist() == ["a"] and frame["label"].tolist() == [2]


def test_two_pulls_at_once_duplicate_nothing(store, tmp_path):
    loop = tmp_path / "loop"
    ids = [f"p{i}" for i in range(300)]
    _log(store, ids)
    store.add_labels([(i, k % 10) for k, i in enumerate(ids)])
    threads = [
        threading.Thread(target=pull_feedback, args=(store, loop, SCHEMA, tmp_path / "q"))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    frame = pd.read_parquet(loop / FEEDBACK)
    assert len(frame) == 300 and frame["id"].is_unique


def test_bad_logged_rows_are_quarantined_not_trained_on(store, tmp_path):
    x = np.ones((2, 64), np.float32)
    x[1, 5] = np.inf  # cannot come from the server, but the pull checks anyway
    _log(store, ["ok", "bad"], x)
    store.add_labels([("ok", 1), ("bad", 2)])
    report = pull_feedback(store, tmp_path / "loop", SCHEMA, tmp_path / "q")
    assert (report.new, report.quarantined) == (1, 1)
    quarantined = pd.read_csv(tmp_path / "q" / "feedback.csv")
    assert quarantined["id"].tolist() == ["bad"] and "non-finite" in quarantined["reason"][0]


def test_training_frames_drop_ids(store, tmp_path):
    loop = tmp_path / "loop"
    loop.mkdir()
    pd.DataFrame({"label": [1], **{f"pixel{i}": [0.0] for i in range(64)}}).to_parquet(
        loop / "bootstrap.parquet"
    )
    _log(store, ["a"])
    store.add_labels([("a", 4)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    bootstrap, feedback = training_frames(loop)
    assert list(feedback.columns) == list(bootstrap.columns)
    assert feedback["label"].tolist() == [4]


def test_an_example_enters_training_once_whatever_its_ids(store, tmp_path):
    """The same image sent again under new ids, or already in the bootstrap pool, adds
    nothing to training; among repeats in the feedback the newest label wins."""
    loop = tmp_path / "loop"
    loop.mkdir()
    rng = np.random.default_rng(1)
    x = (rng.random((3, 64)) * 16).astype(np.float32)
    pool = pd.DataFrame(x[:1], columns=[f"pixel{i}" for i in range(64)])
    pool.insert(0, "label", [7])
    pool.to_parquet(loop / "bootstrap.parquet")
    _log(store, ["in-pool", "a", "b"], x)
    store.add_labels([("in-pool", 7), ("a", 1), ("b", 2)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    _log(store, ["a-again", "b-again"], x[1:])  # a later run resends two of them
    store.add_labels([("a-again", 1), ("b-again", 5)])
    pull_feedback(store, loop, SCHEMA, tmp_path / "q")
    assert len(pd.read_parquet(loop / FEEDBACK)) == 5  # the log is kept whole, by id

    bootstrap, feedback = training_frames(loop)
    assert len(bootstrap) == 1 and len(feedback) == 2
    assert sorted(feedback["label"].tolist()) == [1, 5]  # b's newest label
    np.testing.assert_array_equal(
        np.sort(feedback.drop(columns="label").to_numpy(), axis=0), np.sort(x[1:], axis=0)
    )
