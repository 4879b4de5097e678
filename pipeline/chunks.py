"""Streaming data stages: ingest, validation, the split and the preprocessor's fit, chunk by
chunk, for sources larger than memory (more rows than `data.streaming_above_rows`).

Peak memory is bounded by `data.chunk_rows`, not by the row count:

- ingest reads a Parquet source by record batches and a CSV by pandas chunks, validates
  each chunk against the schema of the first, and appends the clean rows to the snapshot
  (`data/raw/<name>.parquet`, one row group per chunk) and the rejected ones to the
  quarantine; the previous snapshot is replaced only once every chunk has been read;
- the split is a seeded hash of each row's position in the snapshot (`split_of`), so any
  process can assign any row without seeing the others: the single-process path and the
  Dask one (flows/data.py) put every row in the same split. It is not stratified; with this
  many rows every class gets its share by the law of large numbers;
- preprocessing writes one part per snapshot row group into `<split>.parquet/` directories
  (pandas and pyarrow read a directory of parts as one table) and fits the preprocessor from
  per-part statistics (`Moments`: counts, means and centred sums of squares combined with
  Chan's formula, minima, maxima, and the extreme row peaks the range check needs), equal
  to a fit on the whole training split up to float32 rounding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.preprocess import (
    _MIN_SCALE,
    PREPROCESSOR_FILE,
    REPORT_FILE,
    SPLITS,
    Preprocessor,
    choose_scaling,
)
from pipeline.validate import LABEL, Schema, why_refused

log = logging.getLogger(__name__)

# The row-peak percentiles Preprocessor.fit keeps (0.5 and 99.5), as numpy divides them.
PEAK_QUANTILES = (0.5 / 100, 99.5 / 100)


# --- how big a source is ---------------------------------------------------------------------


def source_rows(files: list[Path]) -> int:
    """Rows of the source's files: exact for Parquet (its metadata), estimated for CSV from
    the average length of its first lines (enough to choose the path)."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # noqa: BLE001 - unreadable: the ingest says why, in full
                continue
        elif name.endswith(".csv"):
            with path.open("rb") as fh:
                head = fh.read(1 << 20)
            lines = max(head.count(b"\n"), 1)
            total += int(path.stat().st_size / (len(head) / lines))
    return total


# --- the split -----------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64 (wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_of(positions: np.ndarray, seed: int, val_size: float, test_size: float) -> np.ndarray:
    """(n,) int8 split per row position: 0 train, 1 val, 2 test. A row's split depends only
    on its position in the snapshot and the seed, never on which chunk or worker reads it."""
    with np.errstate(over="ignore"):
        key = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        u = (_mix(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    out = np.zeros(len(positions), dtype=np.int8)
    out[u < test_size + val_size] = 1
    out[u < test_size] = 2
    return out


# --- the preprocessor's statistics ---------------------------------------------------------


@dataclass
class Moments:
    """What `Preprocessor.fit` needs of the training rows, combinable part by part: per
    feature the count, mean, centred sum of squares, minimum and maximum (float64 but the
    extremes), and the `keep` smallest and largest row peaks (max |x| of a row), enough for
    the 0.5th and 99.5th percentiles of up to `keep / 0.005` rows."""

    n: int
    mean: np.ndarray  # (F,) float64
    m2: np.ndarray  # (F,) float64: sum of squared deviations from the mean
    low: np.ndarray  # (F,) float32
    high: np.ndarray  # (F,) float32
    small_peaks: np.ndarray  # (<= keep,) float32, sorted
    large_peaks: np.ndarray  # (<= keep,) float32, sorted

    @staticmethod
    def keep_for(rows: int) -> int:
        """Row peaks to keep at each end for percentiles over at most `rows` rows."""
        return int(np.floor((max(rows, 1) - 1) * PEAK_QUANTILES[0])) + 2

    @classmethod
    def of(cls, features: np.ndarray, keep: int) -> Moments:
        x = np.asarray(features, dtype=np.float32)
        n, f = x.shape
        if n == 0:
            empty = np.zeros(0, np.float32)
            inf = np.full(f, np.inf, np.float32)
            return cls(0, np.zeros(f), np.zeros(f), inf, -inf, empty, empty)
        mean = x.mean(axis=0, dtype=np.float64)
        m2 = ((x - mean) ** 2).sum(axis=0)
        peaks = np.sort(np.abs(x).max(axis=1))
        return cls(n, mean, m2, x.min(axis=0), x.max(axis=0), peaks[:keep], peaks[-keep:])

    def merge(self, other: Moments, keep: int) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        small = np.sort(np.concatenate([self.small_peaks, other.small_peaks]))[:keep]
        large = np.sort(np.concatenate([self.large_peaks, other.large_peaks]))[-keep:]
        low, high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        return Moments(n, mean, m2, low, high, small, large)

    def _peak_percentile(self, q: float) -> float:
        """np.percentile(peaks, 100 q) from the kept extremes, computed as numpy does it
        (linear, in the peaks' float32 with a Python-float weight): the same number."""
        at = q * (self.n - 1)
        below = int(np.floor(at))
        t = float(at - below)
        if q < 0.5:
            a, b = self.small_peaks[below], self.small_peaks[min(below + 1, self.n - 1)]
        else:  # index i from the bottom is n - 1 - i from the top
            top = len(self.large_peaks)
            a = self.large_peaks[top - self.n + below]
            b = self.large_peaks[min(top - self.n + below + 1, top - 1)]
        gap = b - a
        return float(b - gap * (1 - t) if t >= 0.5 else a + gap * t)

    def preprocessor(self, schema: Schema, scaling: str = "auto") -> Preprocessor:
        if self.n == 0:
            raise ValueError("no training rows to fit the preprocessor on")
        scaling = choose_scaling(schema, scaling)
        if scaling == "image":  # one mean and scale over every cell: combine the features'
            cells = self.n * schema.n_features
            mean_all = float(self.mean.sum() * self.n / cells)
            m2_all = float((self.m2 + self.n * (self.mean - mean_all) ** 2).sum())
            mean = np.full(schema.n_features, mean_all)
            std = np.full(schema.n_features, np.sqrt(m2_all / cells))
        else:
            mean, std = self.mean, np.sqrt(self.m2 / self.n)
        scale = np.where(std < _MIN_SCALE, 1.0, std)
        return Preprocessor(
            schema,
            mean.astype(np.float32),
            scale.astype(np.float32),
            self.low.astype(np.float32),
            self.high.astype(np.float32),
            (self._peak_percentile(PEAK_QUANTILES[0]), self._peak_percentile(PEAK_QUANTILES[1])),
            scaling,
        )


# --- preprocessing, part by part -----------------------------------------------------------


@dataclass
class PartResult:
    """One snapshot row group's contribution: rows per split, the training rows' moments."""

    index: int
    rows: dict[str, int]
    moments: Moments


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def process_part(
    raw: Path, index: int, offset: int, out_dir: Path, params: Params, keep: int
) -> PartResult:
    """Split snapshot row group `index` (its first row at `offset` in the snapshot), write its
    rows to `out_dir/<split>.parquet/part-<index>.parquet`, and return the training rows'
    moments. The one unit of work of both the single-process and the Dask path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.ParquetFile(raw).read_row_group(index)
    schema = Schema(tuple(c for c in table.column_names if c != LABEL), params.data.num_classes)
    assigned = split_of(
        np.arange(offset, offset + table.num_rows),
        params.seed,
        params.split.val_size,
        params.split.test_size,
    )
    rows, moments = {}, None
    for code, split in enumerate(SPLITS):
        part = table.filter(pa.array(assigned == code))
        rows[split] = part.num_rows
        target = out_dir / f"{split}.parquet" / part_name(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, target, compression="zstd")
        if split == "train":
            features = np.column_stack(
                [part.column(c).to_numpy().astype(np.float32) for c in schema.feature_names]
            ) if part.num_rows else np.zeros((0, schema.n_features), np.float32)  # fmt: skip
            moments = Moments.of(features, keep)
    assert moments is not None
    return PartResult(index, rows, moments)


def row_group_offsets(raw: Path) -> list[tuple[int, int]]:
    """(row group, first row) of every row group of the snapshot."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(raw).metadata
    out, offset = [], 0
    for g in range(meta.num_row_groups):
        out.append((g, offset))
        offset += meta.row_group(g).num_rows
    return out


def preprocess_stream(
    raw: Path,
    out_dir: Path,
    params: Params,
    key: dict,
    run_parts: Callable[[list[tuple[int, int]], Path, int], Iterator[PartResult]] | None = None,
) -> dict:
    """Split and fit a snapshot part by part into `out_dir` (the streaming `preprocess`).
    `run_parts` runs `process_part` over (row group, offset) pairs into a directory and
    yields the results in any order: in this process by default, on a Dask cluster from
    flows/data.py. The outputs replace the previous ones only when every part is written."""
    import pyarrow.parquet as pq

    parts = row_group_offsets(raw)
    total = pq.ParquetFile(raw).metadata.num_rows
    keep = Moments.keep_for(total)
    schema_names = [c for c in pq.ParquetFile(raw).schema_arrow.names if c != LABEL]
    schema = Schema(tuple(schema_names), params.data.num_classes)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        return _preprocess_parts(raw, out_dir, params, key, run_parts, parts, total, keep,
                                 schema, staging)  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _preprocess_parts(raw, out_dir, params, key, run_parts, parts, total, keep, schema, staging):
    """`preprocess_stream`'s body, inside the try that removes its staging directory."""
    runner = run_parts or _run_here(raw, params)
    rows = dict.fromkeys(SPLITS, 0)
    moments: Moments | None = None
    waiting: dict[int, PartResult] = {}  # parts that came back before an earlier one
    done = 0
    progress = _Progress("preprocess", total)
    for result in runner(parts, staging, keep):
        waiting[result.index] = result
        progress.add(sum(result.rows.values()))
        # Merged in part order, as they come: the same figures whoever ran the parts, and
        # one running total in memory instead of every part's statistics.
        while done < len(parts) and parts[done][0] in waiting:
            part = waiting.pop(parts[done][0])
            moments = part.moments if moments is None else moments.merge(part.moments, keep)
            for split, n in part.rows.items():
                rows[split] += n
            done += 1
    if done != len(parts) or moments is None:
        raise RuntimeError(f"preprocess: {done} of {len(parts)} parts came back")
    preprocessor = moments.preprocessor(schema, params.preprocess.scaling)
    preprocessor.save(staging / PREPROCESSOR_FILE)
    report = {
        **key,
        "rows": rows,
        "feedback_rows": 0,
        "n_features": schema.n_features,
        "image_side": schema.image_side,
        "num_classes": schema.num_classes,
        "streamed": {"parts": len(parts), "split": "hash of row position"},
    }
    _swap_in(staging, out_dir, report)
    log.info("preprocessed %s rows in %d parts (streamed): %s", f"{total:,}", len(parts), rows)
    return report


def _run_here(raw: Path, params: Params):
    """Parts on this process's threads, one per core (Parquet's decoding and encoding and
    numpy release the GIL): two parts in memory at a time on two cores."""

    def run(parts: list[tuple[int, int]], out_dir: Path, keep: int) -> Iterator[PartResult]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 4)) as pool:
            yield from pool.map(
                lambda part: process_part(raw, part[0], part[1], out_dir, params, keep), parts
            )

    return run


def _swap_in(staging: Path, out_dir: Path, report: dict) -> None:
    """Move the staged splits and preprocessor over the old outputs; the report goes last
    (and the old one first), so an interrupted swap is never taken for a finished run."""
    from pipeline.ingest import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        target = out_dir / f"{split}.parquet"
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        os.replace(staging / f"{split}.parquet", target)
    os.replace(staging / PREPROCESSOR_FILE, out_dir / PREPROCESSOR_FILE)
    shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(report, out_dir / REPORT_FILE)


class _Progress:
    """Log lines for long work: rows done, share, rows/s, every few seconds."""

    def __init__(self, what: str, total: int, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.total and self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            share = f" of {self.total:,} ({self.done / self.total:.0%})" if self.total else ""
            log.info("%s: %s rows%s, %s rows/s", self.what, f"{self.done:,}", share,
                     f"{rate:,.0f}")  # fmt: skip


# --- ingest, chunk by chunk ----------------------------------------------------------------


def read_chunks(
    path: Path, chunk_rows: int, row_groups: list[int] | None = None
) -> Iterator[pd.DataFrame]:
    """A Parquet or (optionally gzipped) CSV file as frames of at most `chunk_rows` rows,
    every way it can be unreadable turned into DataFileError naming the file. Parquet is read
    row group by row group (`row_groups`: only those), so a chunk never spans two: whoever
    reads a row group, this process or a Dask worker, cuts it into the same chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.ingest import DataFileError, _check_not_truncated, _check_width, _header_columns

    if is_parquet(path):
        try:
            source = pq.ParquetFile(path)
            _check_width(path, source.metadata.num_columns)
            groups = range(source.metadata.num_row_groups) if row_groups is None else row_groups
            for group in groups:
                for batch in source.iter_batches(batch_size=chunk_rows, row_groups=[group]):
                    yield batch.to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from exc
        return
    if not path.name.lower().endswith((".csv", ".csv.gz")):
        raise DataFileError(f"{path}: the streaming ingest reads .parquet, .csv and .csv.gz")
    if path.name.lower().endswith(".csv"):
        _check_width(path, _header_columns(path))
        _check_not_truncated(path)
    try:
        with pd.read_csv(path, encoding="utf-8", low_memory=False, chunksize=chunk_rows) as it:
            yield from it
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataFileError(f"{path}: no header row: the file holds no CSV data") from exc
    except (pd.errors.ParserError, ValueError, OSError, EOFError) as exc:
        raise DataFileError(f"{path}: not a valid CSV file ({exc})") from exc


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def columns_of(path: Path) -> list[str]:
    """A source file's column names, without reading its rows."""
    import pyarrow.parquet as pq

    from pipeline.ingest import DataFileError

    try:
        if is_parquet(path):
            return [str(c) for c in pq.read_schema(path).names]
        return [str(c) for c in pd.read_csv(path, nrows=0, encoding="utf-8").columns]
    except Exception as exc:  # noqa: BLE001 - every unreadable file says why, with its name
        raise DataFileError(f"{path}: cannot read its columns ({exc})") from exc


@dataclass
class Checked:
    """One validated chunk: what the snapshot, the quarantine and the report take of it."""

    file: int  # index of the source file
    first: bool  # the file's first chunk (its header goes into the content hash)
    columns: list[str]
    clean: object | None  # pyarrow.Table of the clean rows (None: none)
    quarantine: pd.DataFrame | None  # the rejected rows, formulas neutralised
    rows_in: int
    reasons: dict[str, int]
    details: dict[str, int]  # ValidationReport.details
    extra_columns: list[str]
    peak: float  # largest |feature| of the clean rows
    row_hashes: bytes  # pipeline.ingest.content_hash's row part
    clean_at: str | None = None  # the clean rows staged in this Parquet file instead
    quarantine_at: str | None = None  # the rejected rows staged in this CSV file instead


def check_chunk(frame: pd.DataFrame, schema: Schema, path: Path, file: int, first: bool) -> Checked:
    """Validate one chunk (pipeline.validate.validate_frame) and prepare its outputs."""
    import pyarrow as pa

    from pipeline.ingest import DataFileError, neutralise_formulas
    from pipeline.validate import SchemaError, validate_frame

    columns = [str(c) for c in frame.columns]
    hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
    try:
        result = validate_frame(frame, schema, str(path))
    except SchemaError as exc:
        raise DataFileError(f"{path}: {exc}") from exc
    clean, peak = None, 0.0
    if len(result.clean):
        clean = pa.Table.from_pandas(result.clean, preserve_index=False)
        peak = float(np.abs(result.clean.iloc[:, 1:].to_numpy(np.float32)).max())
    bad = neutralise_formulas(result.quarantine) if len(result.quarantine) else None
    return Checked(file, first, columns, clean, bad, len(frame), result.report.reasons,
                   result.report.details, result.report.extra_columns, peak,
                   hashes)  # fmt: skip


def check_row_group(
    path: Path, file: int, group: int, schema: Schema, chunk_rows: int, first: bool,
    staging: Path,
) -> list[Checked]:  # fmt: skip
    """A Parquet source's row group, chunk by chunk: the Dask path's unit of ingest work.
    Each chunk's clean and rejected rows are staged as files in `staging` (seen by this
    worker and the driver), so only counts and row hashes travel back: the worker holds one
    chunk at a time, the driver the hashes of its window of row groups."""
    import pyarrow.parquet as pq

    out = []
    for i, frame in enumerate(read_chunks(path, chunk_rows, [group])):
        chunk = check_chunk(frame, schema, path, file, first=first and i == 0)
        stem = staging / f"file{file:05d}-group{group:07d}-chunk{i:05d}"
        if chunk.clean is not None:
            chunk.clean_at = str(stem.with_suffix(".parquet"))
            pq.write_table(chunk.clean, chunk.clean_at)
            chunk.clean = None
        if chunk.quarantine is not None:
            chunk.quarantine_at = str(stem.with_suffix(".csv"))
            chunk.quarantine.to_csv(chunk.quarantine_at, index=False)
            chunk.quarantine = None
        out.append(chunk)
    return out


def check_file(path: Path, file: int, schema: Schema, chunk_rows: int) -> Iterator[Checked]:
    """A source file, chunk by chunk, in this process: two chunks checked at a time on
    threads (numpy, pandas' hashing and Arrow release the GIL), yielded in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="chunk-check") as pool:
        waiting: deque = deque()
        for i, frame in enumerate(read_chunks(path, chunk_rows)):
            waiting.append(pool.submit(check_chunk, frame, schema, path, file, i == 0))
            if len(waiting) >= 2:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


def _check_here(
    files: list[Path], schema: Schema, chunk_rows: int, staging: Path
) -> Iterator[Checked]:
    for file, path in enumerate(files):
        yield from check_file(path, file, schema, chunk_rows)


def ingest_stream(
    source: str,
    files: list[Path],
    raw_dir: Path,
    quarantine_dir: Path,
    params: Params,
    name: str,
    schema: Schema | None = None,
    allow_schema_change: bool = False,
    check: Callable[[list[Path], Schema, int, Path], Iterator[Checked]] | None = None,
):
    """`pipeline.ingest.ingest` for a source larger than `data.streaming_above_rows`: the
    same outputs and report, written chunk by chunk. Nothing replaces the previous snapshot
    or quarantine until every chunk of every file has been read and validated.

    `check` validates the files' chunks and yields them in order, given a staging directory
    for their rows: in this process by default, on a Dask cluster from flows/data.py; the
    snapshot is written here, in order, so both give the same file."""
    import hashlib
    from concurrent.futures import Future, ThreadPoolExecutor

    import pyarrow.parquet as pq

    from pipeline.ingest import (
        DataFileError,
        IngestReport,
        _umask,
        allowed_change,
        change_from,
        current_features,
        file_md5,
        fixed_test_path,
        write_atomic,
    )
    from pipeline.validate import ValidationReport, infer_schema

    chunk_rows = params.data.chunk_rows
    try:
        current = None if allow_schema_change else current_features(raw_dir / f"{name}.parquet")
        schema = schema or infer_schema(columns_of(files[0]), params.data.num_classes, current)
    except Exception as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{files[0]}: {exc}") from exc
    snapshot = raw_dir / f"{name}.parquet"
    raw_dir.mkdir(parents=True, exist_ok=True)
    staged = raw_dir / f".{name}.parquet.streaming"
    bad_dir = raw_dir / f".{name}.quarantine.streaming"
    shutil.rmtree(bad_dir, ignore_errors=True)
    bad_dir.mkdir(parents=True)
    writer, digest, peak = None, hashlib.md5(), 0.0
    reports = [ValidationReport(source=str(path)) for path in files]
    bad_parts: list[Path] = []
    progress = _Progress("ingest", source_rows(files))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
    pending: list[Future] = []  # writes of clean chunks, in order, while the next is read
    try:
        for chunk in (check or _check_here)(files, schema, chunk_rows, bad_dir):
            report = reports[chunk.file]
            if chunk.first:
                digest.update("\x1f".join(chunk.columns).encode())
                report.extra_columns = chunk.extra_columns
            digest.update(chunk.row_hashes)
            report.rows_in += chunk.rows_in
            report.rows_quarantined += sum(chunk.reasons.values())
            report.rows_ok = report.rows_in - report.rows_quarantined
            report.add(chunk.reasons, chunk.details)
            if chunk.clean is None and chunk.clean_at is not None:
                chunk.clean = pq.read_table(chunk.clean_at)  # staged by a worker
                Path(chunk.clean_at).unlink()
            if chunk.clean is not None:
                if writer is None:
                    writer = pq.ParquetWriter(staged, chunk.clean.schema, compression="zstd")
                while len(pending) >= 2:  # memory: at most two chunks waiting
                    pending.pop(0).result()
                pending.append(pool.submit(writer.write_table, chunk.clean))
                peak = max(peak, chunk.peak)
            if chunk.quarantine is not None:
                part = bad_dir / f"{len(bad_parts):06d}.csv"
                chunk.quarantine.to_csv(part, index=False)
                bad_parts.append(part)
            elif chunk.quarantine_at is not None:
                bad_parts.append(Path(chunk.quarantine_at))
            progress.add(chunk.rows_in)
        for report in reports:
            if report.rows_quarantined:
                log.warning("%s: %d of %d rows quarantined (%s)", report.source,
                            report.rows_quarantined, report.rows_in,
                            report.summary())  # fmt: skip
        if writer is None:
            raise DataFileError(f"{source}: no valid rows; {why_refused(reports)}")
        for future in pending:
            future.result()
        pending.clear()
        writer.close()
        writer = None
        change = allowed_change(source, change_from(snapshot, schema, peak), allow_schema_change)
        empty = pq.read_schema(staged).empty_table()
        write_atomic(fixed_test_path(snapshot), lambda p: pq.write_table(empty, p))
        header = [LABEL, *schema.feature_names, "source", "reason"]
        write_atomic(quarantine_dir / f"{name}.csv", lambda p: _join_csv(bad_parts, p, header))
        os.chmod(staged, 0o666 & ~_umask())
        os.replace(staged, snapshot)
    finally:
        for future in pending:
            future.exception()  # wait: the file is closed after its last write
        pool.shutdown()
        if writer is not None:
            with contextlib.suppress(Exception):  # the error that brought us here is the one
                writer.close()
        staged.unlink(missing_ok=True)
        shutil.rmtree(bad_dir, ignore_errors=True)
    rows_ok = sum(r.rows_ok for r in reports)
    out = IngestReport(
        source=source,
        snapshot=str(snapshot),
        data_hash=file_md5(snapshot),
        schema=schema.to_dict(),
        rows_in=sum(r.rows_in for r in reports),
        rows_ok=rows_ok,
        rows_quarantined=sum(r.rows_quarantined for r in reports),
        files=[r.to_dict() for r in reports],
        source_hash=digest.hexdigest(),
        schema_change=change,
    )
    log.info("ingested %s (streamed, %s rows per chunk): %d rows kept, %d quarantined -> %s",
             source, f"{chunk_rows:,}", rows_ok, out.rows_quarantined, snapshot)  # fmt: skip
    return out


def _join_csv(parts: list[Path], out: Path, empty_header: list[str]) -> None:
    """The quarantined rows' CSV parts as one CSV over the union of their columns (files of
    one source may differ in extra columns), one part in memory at a time."""
    columns: list[str] = []
    for part in parts:
        for column in pd.read_csv(part, nrows=0).columns:
            if column not in columns:
                columns.append(column)
    with out.open("w", encoding="utf-8", newline="") as fh:
        if not parts:
            fh.write(",".join(empty_header) + "\n")
        for i, part in enumerate(parts):
            frame = pd.read_csv(part, dtype=str, keep_default_na=False)
            frame.reindex(columns=columns, fill_value="").to_csv(fh, index=False, header=i == 0)
