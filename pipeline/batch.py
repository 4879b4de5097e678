"""Batch scoring: a CSV or Parquet file of any size, chunk by chunk, through a registered
model, into a CSV or Parquet file of labels and probabilities (`mlops predict`).

Memory stays bounded by the block size: the input is read as a stream of record batches
(pyarrow's streaming CSV reader, Parquet row groups) and the output written as it goes,
into a temporary file that replaces the target only once every row is scored; a bad row
stops the run with its row number and leaves no partial output. With `log`, each chunk's
rows go into the prediction log like online traffic (ids from the id column or generated,
written to the output), so labels can come back through `/feedback`.

A logged run reads the file twice: a first pass checks every row before anything is logged,
so a file that fails leaves the log as it was (each block's rows are committed as they are
scored, and a block once committed cannot be taken back). The ids it makes for a file
without an id column come from the file's rows, so a run again of the same rows (after the
store failed half-way, say) gives them the same ids and the log, which skips ids it holds,
keeps each row once; the logging pass stops at the first block that is not the block the
check read (the file written to in between). The check's memory is bounded too: the ids it
has met go to a temporary SQLite file, and it keeps 16 bytes a block.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.model import Predictor
from pipeline.store import GeneratedIds, LoggedRequest, PredictionStore, StoreUnavailable

DEFAULT_CHUNK_ROWS = 8192
# Files are read (and outputs written) in blocks of at least this many rows, whatever the
# forward pass's chunk: reading and writing 64 rows at a time cost more than the model.
READ_BLOCK_ROWS = 4096
# With --log and no id column: the rows of one logged request (one record in the log, as a
# server request is; `PredictionStore.insert_requests`). A label's lookup reads its whole
# record, so records stay near the size of the server's own large requests.
LOG_REQUEST_ROWS = 256
# A logged id as the server takes one (serving/requests.py; the library does not import the
# server): 1-128 printable ASCII characters, no spaces. `/feedback` refuses any other, so a
# row logged under one could never be labelled.
LOGGED_ID = re.compile(r"[\x21-\x7e]{1,128}")


class BatchError(ValueError):
    """The input cannot be scored as it is; no output was written."""


@dataclass
class BatchResult:
    rows: int
    seconds: float
    logged: int
    output: Path
    # logged rows the log held already under their ids (an earlier run of the same rows):
    # the log keeps its first prediction for each
    already_logged: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def total_rows(path: Path) -> int | None:
    """Rows in the file when it says so cheaply (Parquet's footer); None for CSV."""
    if _kind(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return None


def predict_file(
    source: Path,
    output: Path,
    predictor: Predictor,
    model_name: str,
    model_version: str,
    id_column: str = "id",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    store: PredictionStore | None = None,
    on_chunk: Callable[[int], None] | None = None,
    on_checked: Callable[[int], None] | None = None,
) -> BatchResult:
    """Score every row of `source` into `output` (format from its extension). With `store`,
    every row is checked first (`on_checked` counts them), then scored and logged."""
    names = list(predictor.feature_names)
    kind_out = _kind(output)
    tmp = output.with_name(f".{output.name}.partial")
    read_rows = max(chunk_rows, READ_BLOCK_ROWS)
    start, done, logged = time.perf_counter(), 0, 0
    batches, checked = _batches(source, read_rows, names, id_column), None
    if store is not None:
        # both passes in the same blocks, each whole requests of `_file_ids`
        read_rows = -(-read_rows // LOG_REQUEST_ROWS) * LOG_REQUEST_ROWS
        model = f"{model_name}\0{model_version}"
        checked = _check(source, read_rows, names, id_column, store, on_checked, model)
        batches = _even(_batches(source, read_rows, names, id_column), read_rows)
    writer = None
    try:
        for block, batch in enumerate(batches):
            rows = _features(batch, names, done)
            parts = _ids(batch, id_column, done, len(rows), checked and checked.digest)
            ids = parts[0] if parts and len(parts) == 1 else _joined(parts)
            column_ids = ids if checked is not None and checked.digest is None else None
            if checked is not None and checked.blocks[block : block + 1] != [
                _block_digest(rows, column_ids)
            ]:
                raise BatchError(
                    f"{source}: rows {done}-{done + len(rows) - 1} are not the rows checked"
                    f" (the file changed while it was scored); rows 0-{done - 1} were scored"
                    f" and {logged:,} of them logged before it (no output written)"
                )
            started = time.perf_counter()
            probs = np.concatenate(
                [
                    predictor.predict_proba(rows[i : i + chunk_rows])
                    for i in range(0, len(rows), chunk_rows)
                ]
            )
            labels = probs.argmax(axis=1)
            if store is not None:
                latency_ms = (time.perf_counter() - started) * 1000 / max(len(rows), 1)
                requests = _requests(parts, model_name, model_version, rows, probs, latency_ms)
                logged += _logged(store, requests, done, logged)
            table = _output_table(ids, id_column, labels, probs)
            if writer is None:
                writer = _writer(tmp, kind_out, table.schema)
            writer.write_table(table)
            done += len(rows)
            if on_chunk is not None:
                on_chunk(len(rows))
        if writer is None:
            raise BatchError(f"{source}: no rows to score")
        if checked is not None and len(checked.blocks) != block + 1:  # cut at a block's end
            raise BatchError(
                f"{source}: ends at row {done - 1}, where the rows checked went on (the file"
                f" changed while it was scored); all {done:,} were scored and {logged:,}"
                " logged (no output written)"
            )
        writer.close()
        writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    already = done - logged if store is not None else 0
    return BatchResult(done, time.perf_counter() - start, logged, output, already)


@dataclass
class _Checked:
    """What the first pass found: the digest of the rows of a file without an id column
    (`_file_ids` makes their ids of it; None with one), and one `_block_digest` a block,
    by which the logging pass knows it reads the rows that were checked."""

    digest: bytes | None
    blocks: list[bytes]


def _check(
    source: Path,
    block_rows: int,
    names: list[str],
    id_column: str,
    store: PredictionStore,
    on_checked: Callable[[int], None] | None,
    model: str = "",
) -> _Checked:
    """The first pass of a logged run: every row read and checked as scoring will check it,
    and every id as the server checks its own (one row each, `LOGGED_ID`, and none the log
    holds for another row), so that a bad row or id stops the run before any row is
    logged."""
    done, digest, has_ids, blocks = 0, hashlib.blake2b(digest_size=16), None, []
    digest.update("\0".join(names).encode())  # what the numbers are
    # and the model that scores them: a run again by the same model makes the same ids (the
    # log keeps each row once), the same rows scored by a new version are logged anew
    digest.update(b"\1" + model.encode())
    with _SeenIds() as seen:
        for batch in _even(_batches(source, block_rows, names, id_column), block_rows):
            rows, ids = _features(batch, names, done), None
            has_ids = id_column in batch.schema.names
            if has_ids:
                ids = _column_ids(batch, id_column)
                faults = [
                    _bad_id(ids, id_column),
                    seen.add(ids, done),
                    _logged_elsewhere(store, ids, rows),
                ]
                if any(faults):  # the block's first bad row, whichever check found it
                    k, why = min(f for f in faults if f)
                    raise BatchError(f"row {done + k}: {why}")
            else:
                digest.update(rows.tobytes())  # (n, k) float32, C order: blocks do not show
            blocks.append(_block_digest(rows, ids))
            done += len(rows)
            if on_checked is not None:
                on_checked(len(rows))
    if not done:
        raise BatchError(f"{source}: no rows to score")
    return _Checked(None if has_ids else digest.digest(), blocks)


def _block_digest(rows: np.ndarray, ids: list[str] | None) -> bytes:
    """A block's rows and ids in 16 bytes: 16 bytes a block in memory, not the block."""
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    if ids is not None:
        digest.update(repr(ids).encode())  # repr: no two lists of strings alike
    return digest.digest()


def _requests(
    parts: list[list[str]],
    model_name: str,
    model_version: str,
    rows: np.ndarray,
    probs: np.ndarray,
    latency_ms: float,
) -> list[LoggedRequest]:
    """A block's rows as the requests they are logged as, one for each part of its ids
    (each kept as one record where its ids were made here)."""
    requests, at, now, labels = [], 0, time.time(), probs.argmax(axis=1)
    for part in parts:
        end = at + len(part)
        requests.append(
            LoggedRequest(
                part,
                now,
                model_name,
                model_version,
                rows[at:end],
                labels[at:end].tolist(),
                probs[at:end],
                latency_ms,
            )
        )
        at = end
    return requests


def _bad_id(ids: list[str], id_column: str) -> tuple[int, str] | None:
    """The first of the block's ids that the server would not take (`LOGGED_ID`): its row
    in the block and what is wrong."""
    for k, pid in enumerate(ids):
        if not LOGGED_ID.fullmatch(pid):
            shown = f"id {pid[:40]!r}" if pid else "an empty id"
            more = f" ({len(pid)} characters)" if len(pid) > 40 else ""
            return k, (
                f"column {id_column} has {shown}{more}; a logged id is 1-128 printable ASCII"
                " characters without spaces, as /feedback takes it"
            )
    return None


def _logged_elsewhere(
    store: PredictionStore, ids: list[str], rows: np.ndarray
) -> tuple[int, str] | None:
    """The first of `ids` that the log holds for other features than this file's row: the
    log keeps its first row for an id, so this row would not be logged and a label sent for
    the id would land on the other. An id logged for the same features is this row from an
    earlier run, which the log keeps (counted in `BatchResult.already_logged`)."""
    for start in range(0, len(ids), 500):  # well under SQLite's bound on parameters
        found = store.get(ids[start : start + 500])
        for k in range(start, min(start + 500, len(ids))):
            row = found.get(ids[k])
            if row is not None and not np.array_equal(
                np.asarray(row["features"], np.float32), rows[k]
            ):
                return k, (
                    f"id {ids[k]!r} is already in the prediction log for another row (logged"
                    f" by {row['model_name']} v{row['model_version']}); an id names one row"
                    " for good: give this row another"
                )
    return None


class _SeenIds:
    """The ids of a file met so far, with their rows, in a temporary SQLite file: a file of
    any size is checked for repeated ids in bounded memory (SQLite's page cache, 2 MB by
    default), where a set of them all would grow with the file."""

    def __enter__(self) -> _SeenIds:
        self._dir = tempfile.TemporaryDirectory(prefix="mlops-predict-ids-")
        self._db = sqlite3.connect(Path(self._dir.name) / "ids.db", isolation_level=None)
        # a scratch file, dropped at the end: no journal, no fsync
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, row INTEGER) WITHOUT ROWID")
        return self

    def __exit__(self, *exc) -> None:
        self._db.close()
        self._dir.cleanup()

    def add(self, ids: list[str], offset: int) -> tuple[int, str] | None:
        """Note the ids of rows offset.. of the file; the first of them (its row in `ids`,
        and what is wrong) whose id an earlier row has."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT INTO seen (id, row) VALUES (?, ?)", zip(ids, itertools.count(offset))
            )
        except sqlite3.IntegrityError:
            # the statement stopped at the first repeat: the rows before it were noted
            for k, pid in enumerate(ids):
                (first,) = self._db.execute("SELECT row FROM seen WHERE id = ?", (pid,)).fetchone()
                if first != offset + k:
                    return k, (
                        f"id {pid!r} is also the id of row {first}; with --log every row"
                        " needs an id of its own, or the log keeps one row under it"
                    )
            raise
        finally:
            self._db.execute("COMMIT")
        return None


def _logged(store: PredictionStore, requests: list[LoggedRequest], done: int, logged: int) -> int:
    """The rows of one block put into the log (the block's rows are one commit). Should the
    store fail now, the error says which rows went in before it: the file was checked, so
    what stops a run here is the store or the machine, and a run again of the same file
    finishes it (its ids name the same rows, and the log skips the ids it holds)."""
    try:
        return store.insert_requests(requests)
    except StoreUnavailable as exc:
        if not done:
            raise
        raise StoreUnavailable(
            f"{exc}; rows 0-{done - 1} were scored and {logged:,} of them logged before it"
            " (no output written); run the same command again to finish: the rows logged"
            " keep their ids and are not logged twice"
        ) from exc


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".txt"):
        return "csv"
    raise BatchError(f"{path}: unknown format {suffix or '(no extension)'}: .csv or .parquet")


def _batches(
    source: Path, block_rows: int, names: list[str], id_column: str
) -> Iterator[pa.RecordBatch]:
    if not source.is_file():
        raise BatchError(f"{source} does not exist or is not a file")
    if _kind(source) == "parquet":
        try:
            yield from pq.ParquetFile(source).iter_batches(batch_size=block_rows)
        except (pa.ArrowInvalid, OSError) as exc:
            raise BatchError(f"{source}: not a readable Parquet file ({exc})") from None
        return
    # ~1 KB per row of a few hundred numeric cells: blocks of about block_rows rows
    options = pa_csv.ReadOptions(block_size=max(1 << 20, block_rows * 1024))
    # the types are fixed up front: inferred per block, a column of integers in the first
    # block and 0.5 in a later one would fail half-way
    types = {name: pa.float64() for name in names} | {id_column: pa.string()}
    try:
        reader = pa_csv.open_csv(
            source, read_options=options, convert_options=pa_csv.ConvertOptions(column_types=types)
        )
        for batch in reader:
            for offset in range(0, batch.num_rows, block_rows):
                yield batch.slice(offset, block_rows)
    except pa.ArrowInvalid as exc:
        raise BatchError(f"{source}: {_csv_problem(str(exc), _header(source))}") from None


def _header(source: Path) -> list[str]:
    """The CSV's header, for naming a column pyarrow names by its 0-based index."""
    try:
        return pa_csv.open_csv(source).schema.names
    except (pa.ArrowInvalid, OSError):
        return []


_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to \w+: invalid value '(.*)'")


def _csv_problem(text: str, columns: list[str]) -> str:
    """pyarrow's CSV error in the user's words: a cell that is no number is named by its
    column and value (pyarrow gives the column's 0-based index and no row)."""
    found = _CONVERSION.search(text)
    if found and int(found.group(1)) < len(columns):
        column = columns[int(found.group(1))]
        return (
            f"column {column} holds {found.group(2)[:40]!r}, which is not a number (every "
            "feature cell must be one)"
        )
    return f"not a readable CSV file ({text})"


def _features(batch: pa.RecordBatch, names: list[str], offset: int) -> np.ndarray:
    present = set(batch.schema.names)
    missing = [n for n in names if n not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise BatchError(f"missing feature column(s) {', '.join(missing[:5])}{more}")
    columns = []
    for name in names:
        column = batch.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise BatchError(f"column {name} holds {column.type}, not numbers")
        if column.null_count:
            row = offset + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchError(f"row {row}: column {name} is empty")
        columns.append(column.to_numpy(zero_copy_only=False))
    rows = np.column_stack(columns).astype(np.float32)
    finite = np.isfinite(rows)
    if not finite.all():
        row = offset + int(np.argmin(finite.all(axis=1)))
        raise BatchError(f"row {row}: a value is NaN, infinite or too large for float32")
    return rows


def _ids(
    batch: pa.RecordBatch, id_column: str, offset: int, n: int, digest: bytes | None
) -> list[list[str]] | None:
    """The block's ids, as the requests it is logged as: the id column's, one request; or
    made here from the file's `digest` (`_file_ids`), one request per LOG_REQUEST_ROWS
    rows, each of which the log keeps as one record (as the server's requests) instead of
    a row each."""
    if id_column in batch.schema.names:
        ids = _column_ids(batch, id_column)
        if "" in ids:  # the text "None" is an id like any other
            raise BatchError(f"row {offset + ids.index('')}: column {id_column} has an empty id")
        return [ids]
    if digest is None:
        return None
    return _file_ids(digest, offset, n)


def _column_ids(batch: pa.RecordBatch, id_column: str) -> list[str]:
    """The id column as text, an empty cell as "" (a Parquet null among them)."""
    return ["" if v is None else str(v) for v in batch.column(id_column).to_pylist()]


def _file_ids(digest: bytes, offset: int, n: int) -> list[list[str]]:
    """Ids for rows offset.. (a multiple of LOG_REQUEST_ROWS) of the file whose rows have
    `digest`: request j (rows j * LOG_REQUEST_ROWS..) gets a prefix hashed from the digest,
    the request size and j, in the shape the log keeps as one record (`GeneratedIds`: 32
    hex characters, row k's ending in k). The same rows get the same ids in every run,
    where random ids (`new_ids`) logged a file's rows once more at each run; other rows,
    other ids (a 112-bit hash). UUIDv8 (RFC 9562's custom version), as new_ids' are v7."""
    out = []
    for start in range(offset, offset + n, LOG_REQUEST_ROWS):
        key = (
            digest
            + LOG_REQUEST_ROWS.to_bytes(4, "big")
            + (start // LOG_REQUEST_ROWS).to_bytes(8, "big")
        )
        raw = bytearray(hashlib.blake2b(key, digest_size=14).digest())
        raw[6] = 0x80 | raw[6] & 0x0F  # version 8
        raw[8] = 0x80 | raw[8] & 0x3F  # the RFC variant (binary 10)
        out.append(GeneratedIds(raw.hex(), min(LOG_REQUEST_ROWS, offset + n - start)))
    return out


def _even(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows in blocks of `rows` each (the last may be fewer), whatever blocks the
    reader gives: a request of `_file_ids` never spans two blocks (two inserts under one
    prefix, the second skipped)."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            held.append(batch.slice(0, take))
            batch, count = batch.slice(take), count + take
            if count == rows:
                yield held[0] if len(held) == 1 else pa.concat_batches(held)
                held, count = [], 0
    if held:
        yield held[0] if len(held) == 1 else pa.concat_batches(held)


def _joined(parts: list[list[str]] | None) -> list[str] | None:
    return None if parts is None else [i for part in parts for i in part]


def _output_table(ids, id_column: str, labels: np.ndarray, probs: np.ndarray) -> pa.Table:
    columns: dict = {}
    if ids is not None:
        columns[id_column] = pa.array(ids, pa.string())
    columns["label"] = pa.array(labels.astype(np.int64))
    for k in range(probs.shape[1]):
        columns[f"prob_{k}"] = pa.array(probs[:, k].astype(np.float32))
    return pa.table(columns)


def _writer(path: Path, kind: str, schema: pa.Schema):
    if kind == "parquet":
        return pq.ParquetWriter(str(path), schema)
    return pa_csv.CSVWriter(str(path), schema)
