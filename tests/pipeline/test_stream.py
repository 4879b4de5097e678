"""The production stream: held out from any source, sent a share per round, continued
by a re-run, ids from stream positions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import stream
from pipeline.ingest import load_digits_frame
from pipeline.validate import LABEL, Schema


def _frame(n: int, classes: int = 3, side: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        rng.random((n, side * side)).astype(np.float32),
        columns=[f"pixel{i}" for i in range(side * side)],
    )
    frame.insert(0, LABEL, np.arange(n) % classes)
    return frame


def test_hold_out_matches_the_digits_demo_split():
    everything = load_digits_frame("all")
    pool, held = stream.hold_out(everything, 0.35, 42)
    pd.testing.assert_frame_equal(pool, load_digits_frame("bootstrap", 0.35, 42))
    pd.testing.assert_frame_equal(held, load_digits_frame("stream", 0.35, 42))


def test_hold_out_is_stratified_and_disjoint():
    frame = _frame(300)
    pool, held = stream.hold_out(frame, 0.4, 1)
    assert len(pool) == 120 and len(held) == 180
    assert pool[LABEL].value_counts().to_dict() == {0: 40, 1: 40, 2: 40}
    both = pd.concat([pool, held])
    assert not both.duplicated().any() and len(both) == len(frame)


def test_rounds_continue_where_the_last_run_stopped(tmp_path):
    held = _frame(10)
    digest = stream.save(held, tmp_path)
    first = stream.plan(tmp_path, rounds=2, per_round=0.3)
    assert [(c.start, c.size) for c in first] == [(0, 3), (3, 3)]
    for chunk in first:
        stream.advance(tmp_path, chunk)
    second = stream.plan(tmp_path, rounds=3, per_round=0.3)
    assert [(c.start, c.size) if c else None for c in second] == [(6, 3), (9, 1), None]
    assert second[0].ids()[0] == f"stream-{digest[:10]}-6"
    assert set(first[0].ids()).isdisjoint(second[0].ids())
    assert stream.save(held, tmp_path) == digest  # the same stream again: the cursor stays
    assert stream.read_cursor(tmp_path)["sent"] == 6


def test_a_new_stream_starts_its_cursor_again(tmp_path):
    stream.save(_frame(10), tmp_path)
    stream.advance(tmp_path, stream.plan(tmp_path, 1, 0.5)[0])
    assert stream.read_cursor(tmp_path)["sent"] == 5
    stream.save(_frame(12), tmp_path)
    assert stream.read_cursor(tmp_path)["sent"] == 0


@pytest.mark.parametrize("side", [4, 8, 28])
def test_drift_distortion_moves_images_right(side):
    x = np.zeros((2, side * side), np.float32)
    x[:, 0] = 1.0  # the top-left pixel
    schema = Schema(tuple(f"pixel{i}" for i in range(side * side)), 10)
    moved = stream.distort(x, schema).reshape(2, side, side)
    assert moved[:, 0, 0].sum() == 0 and moved[:, 0, max(1, side // 4)].tolist() == [1.0, 1.0]


def test_drift_distortion_of_a_plain_table_shifts_every_feature():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    schema = Schema(("a", "b", "c"), 2)
    assert (stream.distort(x, schema).mean(0) - x.mean(0) > 1).all()
