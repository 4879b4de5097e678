"""The shadow's running accuracy figures count every labelled pair once, whichever half of
the pair (the label or the shadow's answer) is committed last, on both backends.

The server's summary reads incrementally. A shadow answer is written a moment after it is
scored, so a label can land first (CI counted 88 of 120 rows so); and a label's stamp is
taken before its commit, so one can land stamped before the previous read."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.store import encode_rows, predictions
from serving.shadow import Shadow


@pytest.fixture
def store(store_on_both):
    return store_on_both


def _shadow(store) -> Shadow:
    settings = SimpleNamespace(
        model_name="m", shadow_model="2", shadow_fraction=1.0, shadow_max_pending_rows=100
    )
    return Shadow(settings, store, writer=None)  # only the summary is exercised


def _served(store, ids, label=3):
    p = encode_rows(np.full((len(ids), 10), 0.1, np.float32))
    x = encode_rows(np.zeros((len(ids), 64), np.float32))
    store.insert(
        [(i, time.time(), "m", "1", f, label, q, 1.0) for i, f, q in zip(ids, x, p, strict=True)]
    )


def _answers(store, ids, label, at):
    p = encode_rows(np.full((len(ids), 10), 0.1, np.float32))
    store.insert_shadow([(i, "2", "m", at, label, q) for i, q in zip(ids, p, strict=True)])


def _labelled(shadow) -> tuple[int, float, float]:
    shadow._summarise()
    (s,) = shadow.summary or [{"labelled": 0, "champion_accuracy": 0, "shadow_accuracy": 0}]
    return s["labelled"], s["champion_accuracy"], s["shadow_accuracy"]


def _whole(store) -> tuple[int, float, float]:
    """The same figures from the full join (`mlops status`'s read)."""
    (s,) = store.shadow_summary("m")
    return s["labelled"], s["champion_accuracy"], s["shadow_accuracy"]


def test_a_label_before_the_shadow_answer_and_a_late_committed_label_are_counted_once(store):
    shadow = _shadow(store)
    ids = [f"r{k}" for k in range(6)]
    _served(store, ids, label=3)  # the champion answered 3 for all
    scored_at = time.time()  # the shadow scored r0-r3 now, answering 4 ...
    _answers(store, ids[:2], label=4, at=scored_at)  # ... but wrote only r0, r1 so far
    store.add_labels([(i, 3) for i in ids[:4]])  # truth 3 for r0-r3
    assert _labelled(shadow) == (2, 1.0, 0.0)
    _answers(store, ids[2:4], label=4, at=scored_at)  # written after the label
    assert _labelled(shadow) == (4, 1.0, 0.0)
    _answers(store, ids[4:], label=3, at=time.time())
    stamped = time.time()  # a slow transaction stamps labels for r4, r5 ...
    time.sleep(0.01)
    assert _labelled(shadow) == (4, 1.0, 0.0)  # read again: nothing counted twice
    with store.engine.begin() as conn:  # ... and commits them after that read
        conn.execute(
            predictions.update()
            .where(predictions.c.id.in_(ids[4:]))
            .values(true_label=3, labelled_at=stamped)
        )
    assert _labelled(shadow) == (6, 1.0, pytest.approx(2 / 6))

    # a row re-labelled soon after: its new label replaces the old in the figures
    store.add_labels([("r0", 4)], overwrite=True)
    assert _labelled(shadow) == (6, pytest.approx(5 / 6), pytest.approx(3 / 6))


def test_pairs_older_than_the_lateness_are_not_read_again(store, monkeypatch):
    """The ids kept to avoid counting twice are only those a read can still return."""
    shadow = _shadow(store)
    ids = ["a", "b"]
    _served(store, ids)
    _answers(store, ids, label=3, at=time.time())
    store.add_labels([(i, 3) for i in ids])
    assert _labelled(shadow) == (2, 1.0, 1.0)
    assert set(shadow._seen) == {("a", "2"), ("b", "2")}
    monkeypatch.setattr("serving.shadow.LATENESS_S", -3600.0)  # as if an hour had passed
    assert _labelled(shadow) == (2, 1.0, 1.0)
    assert shadow._seen == {}


def test_a_relabel_that_changes_no_answers_rightness_is_not_counted_again(store, monkeypatch):
    """Champion 3, shadow 4, truth 5 then 6: both still wrong. The relabel's newer stamp
    keeps the id among those counted, so the reads after it do not count it a second time
    once the first label's stamp is out of the window."""
    monkeypatch.setattr("serving.shadow.LATENESS_S", 1.0)
    shadow = _shadow(store)
    _served(store, ["w"], label=3)
    _answers(store, ["w"], label=4, at=time.time())
    store.add_labels([("w", 5)])
    assert _labelled(shadow) == (1, 0.0, 0.0)
    time.sleep(1.3)
    store.add_labels([("w", 6)], overwrite=True)
    assert _labelled(shadow) == (1, 0.0, 0.0)
    assert _labelled(shadow) == (1, 0.0, 0.0)
    (whole,) = store.shadow_summary("m")  # the full join agrees
    assert whole["labelled"] == 1


def test_a_relabel_after_the_lateness_replaces_the_label_counted(store, monkeypatch):
    """Truth 3 then, after the old label left the ids kept, 4: the figures take back the
    label they counted (the store keeps it for each overwrite) instead of counting the
    row twice, and agree with the full join."""
    monkeypatch.setattr("serving.shadow.LATENESS_S", 1.0)
    shadow = _shadow(store)
    _served(store, ["x", "y"], label=3)  # the champion answered 3 ...
    _answers(store, ["x", "y"], label=4, at=time.time())  # ... the shadow 4
    store.add_labels([("x", 3), ("y", 3)])
    assert _labelled(shadow) == (2, 1.0, 0.0)
    time.sleep(1.3)
    assert _labelled(shadow) == (2, 1.0, 0.0)
    assert shadow._seen == {}  # x's first label is out of the window
    store.add_labels([("x", 4)], overwrite=True)
    assert _labelled(shadow) == (2, 0.5, 0.5)
    assert _labelled(shadow) == (2, 0.5, 0.5)  # read again: not taken back twice
    assert _whole(store) == (2, 0.5, 0.5)


def test_a_label_overwritten_from_before_the_shadow_started_is_not_taken_back(store):
    _served(store, ["z"], label=3)
    store.add_labels([("z", 3)])  # labelled before this shadow started
    time.sleep(0.01)
    shadow = _shadow(store)
    _answers(store, ["z"], label=4, at=time.time())
    store.add_labels([("z", 4)], overwrite=True)
    assert _labelled(shadow) == (1, 0.0, 1.0)


def test_labels_overwritten_between_two_reads_were_never_counted(store, monkeypatch):
    """A label corrected before the next read counts once, with the correction; a row
    labelled twice more after the lateness takes back the label it had at the last read."""
    monkeypatch.setattr("serving.shadow.LATENESS_S", 1.0)
    shadow = _shadow(store)
    _served(store, ["q", "r"], label=3)
    _answers(store, ["q", "r"], label=4, at=time.time())
    assert _labelled(shadow) == (0, 0.0, 0.0)
    store.add_labels([("q", 4)])
    store.add_labels([("q", 3)], overwrite=True)  # corrected before the next read
    store.add_labels([("r", 3)])
    assert _labelled(shadow) == (2, 1.0, 0.0)
    time.sleep(1.3)
    assert _labelled(shadow) == (2, 1.0, 0.0) and shadow._seen == {}
    store.add_labels([("q", 5)], overwrite=True)  # two labels after the one counted (3)
    store.add_labels([("q", 4)], overwrite=True)
    assert _labelled(shadow) == (2, 0.5, 0.5)
    assert _whole(store) == (2, 0.5, 0.5)


def test_a_label_whose_pair_was_incomplete_at_the_last_read_is_not_taken_back(store):
    """x's label lands before the shadow's answer, so the read after it counts only y; x
    is then corrected: nothing of x was counted, so nothing is taken back."""
    shadow = _shadow(store)
    _served(store, ["y", "x"], label=3)
    _answers(store, ["y"], label=4, at=time.time())
    store.add_labels([("y", 4), ("x", 3)])
    assert _labelled(shadow) == (1, 0.0, 1.0)
    _answers(store, ["x"], label=4, at=time.time())
    store.add_labels([("x", 4)], overwrite=True)
    assert _labelled(shadow) == (2, 0.0, 1.0)
    assert _whole(store) == (2, 0.0, 1.0)
