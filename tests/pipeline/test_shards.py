"""Training from shards: the Parquet row groups read as an IterableDataset (pipeline/shards.py)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.preprocess import Preprocessor, split_path
from pipeline.shards import ShardDataset, count_rows, train_from_shards
from pipeline.validate import LABEL, Schema

SCHEMA = Schema(("row", "other"), 3)
# mean 0, scale 1: the dataset hands back the raw values, so feature "row" names the row
IDENTITY = Preprocessor(SCHEMA, np.zeros(2, np.float32), np.ones(2, np.float32))


@pytest.fixture
def one_thread():
    """Small models train several times faster on one thread when other work shares the
    cores (two threads wait on each other): 15 s against 90 s for the accuracy test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_rows(path: Path, first: int, rows: int, row_group_size: int) -> None:
    ids = np.arange(first, first + rows)
    table = pa.table(
        {
            LABEL: ids % 3,
            "row": ids.astype(np.float32),
            "other": (-ids).astype(np.float32),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """1,333 rows in two files of uneven row groups (97 and 50 rows, short last ones)."""
    root = tmp_path / "train.parquet"
    root.mkdir()
    write_rows(root / "part-0.parquet", 0, 1000, 97)
    write_rows(root / "part-1.parquet", 1000, 333, 50)
    return root


def dataset(source: Path, **kwargs) -> ShardDataset:
    options = {"batch_size": 32, "shuffle_buffer": 100, "seed": 7, "rank": 0, "world_size": 1}
    return ShardDataset(source, IDENTITY, **(options | kwargs))


def rows_of(batches) -> np.ndarray:
    """The row ids of an epoch's batches, in order, after checking each row is whole."""
    ids = []
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(y), 2)
        row = x[:, 0].long()
        assert torch.equal(x[:, 1], -x[:, 0]) and torch.equal(y, row % 3)  # columns together
        ids.append(row.numpy())
    return np.concatenate(ids)


def epoch_rows(ds: ShardDataset, epoch: int = 1) -> np.ndarray:
    ds.set_epoch(epoch)
    return rows_of(ds)


def test_one_process_sees_every_row_once_per_epoch(source):
    ds = dataset(source)
    assert count_rows(source) == ds.rows == 1333 and len(ds.groups) == 11 + 7
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        batches = list(ds)
        assert sorted(rows_of(batches)) == list(range(1333))
        assert len(batches) == ds.batches_per_epoch() == math.ceil(1333 / 32)
        assert [len(y) for _, y in batches[:-1]] == [32] * (len(batches) - 1)


def test_two_dataloader_workers_share_the_epoch(source):
    ds = dataset(source)
    ds.set_epoch(3)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(rows_of(batches)) == list(range(1333))
    assert len(batches) == ds.batches_per_epoch(workers=2)


@pytest.mark.parametrize(
    ("rows", "row_group_size", "world"),
    [
        (1000, 97, 2),  # divides evenly: each row exactly once
        (1001, 97, 2),  # one row short: rank 1 pads with one row rank 0 also sees
        (10, 10, 3),  # fewer row groups than ranks: the one group is split three ways
    ],
)
def test_ranks_split_the_epoch_into_equal_shares(tmp_path, rows, row_group_size, world):
    path = tmp_path / "train.parquet"
    write_rows(path, 0, rows, row_group_size)
    shares = [dataset(path, rank=r, world_size=world, batch_size=3) for r in range(world)]
    for epoch in (1, 2):
        seen = [epoch_rows(ds, epoch) for ds in shares]
        quota = math.ceil(rows / world)
        assert [len(s) for s in seen] == [quota] * world  # the same batches on every rank
        counts = Counter(np.concatenate(seen).tolist())
        assert set(counts) == set(range(rows))
        assert sum(c - 1 for c in counts.values()) == world * quota - rows  # the padding
        assert len({ds.batches_per_epoch() for ds in shares}) == 1


def test_the_rank_comes_from_torchrun_s_environment(source, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = ShardDataset(source, IDENTITY, batch_size=32, shuffle_buffer=100, seed=7)
    assert (from_env.rank, from_env.world_size) == (1, 2)
    given = dataset(source, rank=1, world_size=2)
    assert np.array_equal(epoch_rows(from_env), epoch_rows(given))
    rank0 = epoch_rows(dataset(source, rank=0, world_size=2))
    both = np.concatenate([rank0, epoch_rows(given)])
    assert set(both.tolist()) == set(range(1333)) and len(both) == 1334  # one row padded


def test_the_order_changes_every_epoch_and_repeats_with_the_seed(source):
    first, again, other = dataset(source), dataset(source), dataset(source, seed=8)
    epoch1, epoch2 = epoch_rows(first, 1), epoch_rows(first, 2)
    assert not np.array_equal(epoch1, epoch2)
    assert np.array_equal(epoch1, epoch_rows(again, 1))
    assert np.array_equal(epoch2, epoch_rows(again, 2))
    assert not np.array_equal(epoch1, epoch_rows(other, 1))
    # the row groups come in another order too, not only the buffer's draws
    orders = []
    for epoch in (1, 2):
        first.set_epoch(epoch)
        orders.append(first.epoch_order())
    assert orders[0] != orders[1] and sorted(map(str, orders[0])) == sorted(map(str, orders[1]))


def test_the_shuffle_buffer_is_bounded(tmp_path):
    """One row group read 10 rows at a time through a buffer of 100: no row can leave more
    than 100 places before it was read, and the buffer never holds more."""
    path = tmp_path / "train.parquet"
    write_rows(path, 0, 2000, 2000)
    ds = dataset(path, shuffle_buffer=100, read_rows=10)
    order = epoch_rows(ds)
    position = np.empty(2000, dtype=np.int64)
    position[order] = np.arange(2000)
    ids = np.arange(2000)
    assert (position > ids - 100).all()
    assert ds.peak_buffered == 100
    assert np.abs(position - ids).mean() > 25  # and it does mix within that reach


def test_auto_trains_from_shards_above_the_streaming_threshold(tmp_path, params):
    processed = tmp_path / "processed"
    processed.mkdir()
    write_rows(split_path(processed, "train"), 0, 500, 100)
    assert params.train.from_shards == "auto"

    def resolved(from_shards: str, above: int) -> bool:
        changed = params.updated(
            train={"from_shards": from_shards}, data={"streaming_above_rows": above}
        )
        return train_from_shards(changed, processed)

    assert resolved("auto", 499) and not resolved("auto", 500)
    assert resolved("on", 10**9) and not resolved("off", 1)


def test_training_from_shards_augments_and_is_deterministic(
    prepared, settings, params, monkeypatch, one_thread
):
    import pipeline.train as train
    from pipeline.train import SplitData, TrainParams, train_model

    data = SplitData.load(settings.processed_dir, from_shards=True)
    assert "train" not in data.x and data.train_from == "shards"
    tp = replace(TrainParams.from_params(params), epochs=2)
    assert tp.augment and data.preprocessor.schema.image_side == 8
    calls = []

    def counting(batch, *args, **kwargs):
        calls.append(batch.shape)
        return augment(batch, *args, **kwargs)

    augment = train.augment_batch
    monkeypatch.setattr(train, "augment_batch", counting)
    a = train_model(data, tp, "cpu", show_progress=False)
    rows = len(pd.read_parquet(split_path(settings.processed_dir, "train")))
    assert len(calls) == 2 * math.ceil(rows / tp.batch_size)
    assert all(shape[1:] == (1, 8, 8) for shape in calls)  # shifted as images
    b = train_model(data, tp, "cpu", show_progress=False)
    for (name, wa), (_, wb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(wa, wb), name


def test_shards_reach_the_in_memory_accuracy(prepared, settings, params, one_thread):
    """The same seeds trained from shards and from memory (the demo's epoch budget): test
    accuracy within the in-memory seeds' spread."""
    from pipeline.train import SplitData, TrainParams, train_model

    accuracy = {}
    for path in ("shards", "memory"):
        data = SplitData.load(settings.processed_dir, from_shards=path == "shards")
        test_x = torch.from_numpy(data.x["test"])
        accuracy[path] = []
        for seed in (0, 1, 2):
            tp = replace(TrainParams.from_params(params), seed=seed)
            model = train_model(data, tp, "cpu", show_progress=False).model
            accuracy[path].append(float((model(test_x).argmax(1).numpy() == data.y["test"]).mean()))
    shards, memory = np.array(accuracy["shards"]), np.array(accuracy["memory"])
    spread = max(memory.max() - memory.min(), 0.02)
    assert abs(shards.mean() - memory.mean()) <= spread, accuracy
    assert shards.min() >= memory.min() - spread, accuracy


def test_a_run_says_which_path_it_trained_on(prepared, settings, params):
    import mlflow

    from pipeline.experiment import fit

    on = params.updated(train={"from_shards": "on"})
    cand = fit(settings, on, epochs=1, register_model=False, show_progress=False)
    assert mlflow.MlflowClient().get_run(cand.run_id).data.tags["train_data"] == "shards"
