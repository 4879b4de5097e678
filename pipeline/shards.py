"""Training from the split's Parquet row groups: a torch IterableDataset, so the training set
need not fit in memory (`train.from_shards` in params.yaml; pipeline/train.py uses it).

    ds = ShardDataset(split_path(processed, "train"), preprocessor, batch_size=32,
                      shuffle_buffer=65_536, seed=42)
    ds.set_epoch(epoch)                      # a new order each epoch, like DistributedSampler
    for xb, yb in ds: ...                    # (B, F) float32 standardised, (B,) int64

The source is one Parquet file or a directory of them; their row groups are known from the
footers alone (nothing is loaded to count rows).

Order. An epoch reads the row groups in an order shuffled with (seed, epoch) and passes the
rows through a buffer of `shuffle_buffer` rows: each row read replaces a randomly chosen
buffered row, which goes out (tf.data's shuffle buffer, drawn a chunk at a time). Memory is
the buffer plus one read chunk, whatever the split's size; the price is that rows of one row
group mix only within the buffer's reach, so a split sorted by label needs a buffer of about
a row group (the processed splits keep the source's order, which is not sorted).

Sharding. An epoch's stream (every row, in that row-group order) is cut into equal,
contiguous ranges: rank r of W takes positions [r*q, (r+1)*q), q = ceil(N / W), and
positions past N wrap to the stream's start. So every rank yields the same number of rows
and batches (DDP's all-reduces pair up however few or uneven the row groups are: a row group
is split between ranks where a range ends inside it), every row is seen once per epoch, and
when W does not divide N the W*q - N < W first rows of the epoch's stream are seen twice:
the padding DistributedSampler does for the in-memory path, rather than dropping rows. A
rank's range is cut the same way among its DataLoader workers (without the wrap).

Rank and world size come from torch.distributed when it is initialised, else from the RANK
and WORLD_SIZE environment variables (torchrun sets both), unless given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config import Params
from pipeline.preprocess import Preprocessor, split_path
from pipeline.validate import LABEL

READ_ROWS = 8_192  # rows decoded per read: small beside the buffer, large enough for pyarrow


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file of the source."""

    path: Path
    index: int
    rows: int


def parquet_files(source: Path) -> list[Path]:
    """The source's Parquet files: the file itself, or a directory's *.parquet, sorted."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no Parquet files under {source}")
        return files
    if not source.exists():
        raise FileNotFoundError(source)
    return [source]


def row_groups(source: Path) -> list[RowGroup]:
    """Every row group of the source, from the files' footers (no data is read)."""
    groups = []
    for path in parquet_files(source):
        meta = pq.ParquetFile(path).metadata
        sizes = (meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        groups += [RowGroup(path, i, rows) for i, rows in enumerate(sizes)]
    return groups


def count_rows(source: Path) -> int:
    """Rows of a Parquet file or directory, from the footers."""
    return sum(g.rows for g in row_groups(source))


def train_from_shards(params: Params, processed_dir: Path) -> bool:
    """`train.from_shards` resolved: "on", "off", or "auto": on when the training split has
    more rows than `data.streaming_above_rows` (counted from the Parquet footers)."""
    setting = params.train.from_shards
    if setting != "auto":
        return setting == "on"
    return count_rows(split_path(processed_dir, "train")) > params.data.streaming_above_rows


def distributed_position() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else RANK and WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardDataset(IterableDataset):
    """Standardised mini-batches `(x, y)` of a Parquet source, read a chunk at a time: this
    rank's and this DataLoader worker's share of the epoch, shuffled (module docstring).

    Use it with `DataLoader(ds, batch_size=None)` (it batches itself: collating row by row
    costs more than the reading) or iterate it directly; call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        source: Path,
        preprocessor: Preprocessor,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        read_rows: int = READ_ROWS,
    ) -> None:
        if batch_size < 1 or shuffle_buffer < 1 or read_rows < 1:
            raise ValueError("batch_size, shuffle_buffer and read_rows must be positive")
        default_rank, default_world = distributed_position()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        self.source = Path(source)
        self.groups = row_groups(self.source)
        self.rows = sum(g.rows for g in self.groups)
        if self.rows == 0:
            raise ValueError(f"{source} has no rows")
        self.preprocessor = preprocessor
        self.columns = [*preprocessor.schema.feature_names, LABEL]
        self.batch_size, self.shuffle_buffer, self.read_rows = batch_size, shuffle_buffer, read_rows
        self.seed, self.epoch = seed, 0
        self.peak_buffered = 0  # the most rows the shuffle buffer held (in this process)

    @property
    def rows_per_rank(self) -> int:
        """Rows every rank yields per epoch: ceil(rows / world size)."""
        return math.ceil(self.rows / self.world_size)

    def batches_per_epoch(self, workers: int = 0) -> int:
        """Batches this rank yields per epoch with `workers` DataLoader workers (0: in
        process); the same on every rank. Each worker's last batch may be short."""
        return sum(math.ceil(n / self.batch_size) for n in _cut(self.rows_per_rank, workers))

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration follows (workers get it when they start)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 0)
        sizes = _cut(self.rows_per_rank, workers)
        start = self.rank * self.rows_per_rank + sum(sizes[:worker])
        rows = sizes[worker]
        if rows == 0:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buffer = _ShuffleBuffer(
            min(self.shuffle_buffer, rows), self.preprocessor.schema.n_features, rng
        )
        pending = _Batcher(self.batch_size)
        for x, y in self._read(start, rows):
            yield from pending.add(*buffer.push(x, y))
            self.peak_buffered = max(self.peak_buffered, buffer.size)
        yield from pending.add(*buffer.drain())
        yield from pending.flush()

    def epoch_order(self) -> list[RowGroup]:
        """This epoch's row-group order: the same on every rank and worker."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return [self.groups[i] for i in rng.permutation(len(self.groups))]

    def _read(self, start: int, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Standardised features and labels of stream positions [start, start + rows), the
        positions taken modulo the source's rows (the padding wraps to the stream's start)."""
        order, files = self.epoch_order(), {}
        while rows > 0:
            start %= self.rows
            offset = 0
            for group in order:
                if rows == 0 or offset + group.rows <= start:
                    offset += group.rows
                    continue
                lo = start - offset
                hi = min(group.rows, lo + rows)
                if group.path not in files:
                    files[group.path] = pq.ParquetFile(group.path)
                yield from self._read_group(files[group.path], group.index, lo, hi)
                start, rows = start + hi - lo, rows - (hi - lo)
                offset += group.rows

    def _read_group(
        self, file: pq.ParquetFile, index: int, lo: int, hi: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows [lo, hi) of one row group, `read_rows` at a time."""
        at = 0
        for batch in file.iter_batches(
            batch_size=self.read_rows, row_groups=[index], columns=self.columns
        ):
            end = at + batch.num_rows
            if end > lo:
                part = batch.slice(max(lo - at, 0), min(hi, end) - max(lo, at))
                yield self._features_labels(part)
            if end >= hi:
                return
            at = end

    def _features_labels(self, batch) -> tuple[np.ndarray, np.ndarray]:
        names = self.preprocessor.schema.feature_names
        raw = np.empty((batch.num_rows, len(names)), dtype=np.float32)  # (n, F)
        for j, name in enumerate(names):
            raw[:, j] = batch.column(name).to_numpy(zero_copy_only=False)
        labels = batch.column(LABEL).to_numpy(zero_copy_only=False).astype(np.int64)
        return self.preprocessor.transform(raw), labels


def _cut(rows: int, workers: int) -> list[int]:
    """`rows` cut into `workers` near-equal contiguous parts (one part for 0 workers)."""
    parts = max(workers, 1)
    return [rows // parts + (i < rows % parts) for i in range(parts)]


class _ShuffleBuffer:
    """At most `capacity` rows; each row pushed in replaces a random buffered row, which
    goes out. Vectorised a chunk at a time: a chunk's k rows take k distinct random slots."""

    def __init__(self, capacity: int, n_features: int, rng: np.random.Generator) -> None:
        self.x = np.empty((capacity, n_features), dtype=np.float32)
        self.y = np.empty(capacity, dtype=np.int64)
        self.size, self.rng = 0, rng

    def push(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add rows; return as many as overflowed the buffer, drawn from it at random."""
        capacity = len(self.y)
        fill = min(capacity - self.size, len(y))
        self.x[self.size : self.size + fill] = x[:fill]
        self.y[self.size : self.size + fill] = y[:fill]
        self.size += fill
        out_x, out_y = [], []
        for at in range(fill, len(y), capacity):
            k = min(capacity, len(y) - at)
            slots = self.rng.choice(capacity, k, replace=False)
            out_x.append(self.x[slots])  # fancy indexing copies before the slots are reused
            out_y.append(self.y[slots])
            self.x[slots], self.y[slots] = x[at : at + k], y[at : at + k]
        if not out_y:
            return self.x[:0].copy(), self.y[:0].copy()
        return np.concatenate(out_x), np.concatenate(out_y)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """What is left, in random order; the buffer is empty afterwards."""
        order = self.rng.permutation(self.size)
        self.size = 0
        return self.x[order], self.y[order]


class _Batcher:
    """Rows in, mini-batches of `batch_size` out; `flush` gives the short last one."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.y is not None and len(self.y):
            x, y = np.concatenate([self.x, x]), np.concatenate([self.y, y])
        full = len(y) - len(y) % self.batch_size
        for at in range(0, full, self.batch_size):
            end = at + self.batch_size
            yield torch.from_numpy(x[at:end]), torch.from_numpy(y[at:end])
        self.x, self.y = x[full:], y[full:]

    def flush(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.y is not None and len(self.y):
            yield torch.from_numpy(self.x), torch.from_numpy(self.y)
        self.x = self.y = None
