"""Feedback -> data source: labelled predictions come back as a new DVC-versioned data version.

The loop's data lives in one DVC-tracked directory, `data/loop/`:

    bootstrap.parquet      the initial pool (from the source: digits, a file, a directory)
    feedback.parquet       labelled predictions pulled from the prediction log (id, label, features)
    feedback_state.json    the watermark of the last pull

Only rows with a ground-truth label come back (never the model's own prediction); rows are
de-duplicated by prediction id (a re-labelled id keeps its newest label); the watermark
makes a second pull add nothing (it reads again from a minute before it, for labels that
were committed late); a lock makes two concurrent pulls safe.

Training never sees one example twice: `training_frames` also drops feedback rows whose
features equal a bootstrap row or a newer feedback row (a content hash of the feature
values), so the same image sent again under a new id adds nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from pipeline.ingest import write_atomic, write_json_atomic
from pipeline.store import CHUNK_ROWS, PredictionStore, decode_rows
from pipeline.validate import LABEL, Schema, validate_frame

log = logging.getLogger(__name__)

BOOTSTRAP, FEEDBACK, STATE = "bootstrap.parquet", "feedback.parquet", "feedback_state.json"
SOURCE = "source.json"  # where the bootstrap pool came from: {"source", "source_hash"}
ID = "id"
# A label's labelled_at is stamped before its transaction commits, so a label can become
# visible after a pull that read newer ones. Each pull reads again from this long before
# the watermark (de-duplication by id makes the rows read twice add nothing), so a label
# committed late is pulled by the next pull instead of never.
LATENESS_S = 60.0
# The state keeps the ids and stamps of the rows the next pull reads again, up to this many
# (the retrain trigger's count of late labels, `unpulled_labels`); beyond, their number.
WINDOW_IDS = 1_000


@dataclass
class PullReport:
    pulled: int  # labelled rows read from the log since LATENESS_S before the watermark
    new: int  # rows added or re-labelled in feedback.parquet
    quarantined: int
    total_feedback: int
    watermark: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_state(loop_dir: Path) -> dict:
    path = loop_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {"watermark": 0.0, "pulls": 0}


def unpulled_labels(store: PredictionStore, loop_dir: Path) -> int:
    """Labels in the log that the next pull would add: those stamped after the watermark,
    and those stamped in the LATENESS_S before it that the last pull did not read (late
    commits, and rows of the window labelled again there): the pull recorded the window's
    ids and stamps. Where it held more than WINDOW_IDS rows only their number was kept:
    then the rows the window holds beyond that number count as late labels (a row of it
    labelled again since, now after the watermark, hides one). A state written before
    either was recorded counts the labels after the watermark only."""
    state = read_state(loop_dir)
    mark = state["watermark"]
    after = store.count_labelled_since(mark)
    if not state["pulls"]:
        return after
    if state.get("window") is not None:
        seen = {(pid, at) for pid, at in state["window"]}
        found = store.labelled_stamps(mark - LATENESS_S, mark)
        return after + sum((pid, at) not in seen for pid, at in found)
    if state.get("window_rows") is None:
        return after
    late = store.count_labelled_since(mark - LATENESS_S, upto=mark) - state["window_rows"]
    return after + max(0, late)


def read_source(loop_dir: Path) -> dict:
    """The source the bootstrap pool was ingested from (part of the data version)."""
    path = loop_dir / SOURCE
    return json.loads(path.read_text()) if path.exists() else {"source": "", "source_hash": ""}


def read_feedback(loop_dir: Path) -> pd.DataFrame | None:
    path = loop_dir / FEEDBACK
    return pd.read_parquet(path) if path.exists() else None


def pull_feedback(
    store: PredictionStore,
    loop_dir: Path,
    schema: Schema,
    quarantine_dir: Path,
    chunk_rows: int = CHUNK_ROWS,
) -> PullReport:
    """Append the labelled predictions logged since the last pull to feedback.parquet.

    The log is read `chunk_rows` at a time (a server-side cursor on PostgreSQL), each chunk
    validated and written as one row group of a staged file, so memory is bounded by the
    chunk, not the log. De-duplication by id stays exact: the database returns each id
    once (the log's primary key; one statement reads one snapshot), and this process keeps
    only the pull's ids and labels whole (~40 bytes a row, against 256 of features). The
    feedback so far is streamed a chunk at a time and matched against those ids: an old row
    whose id comes again gives way to the pulled one, appended with its newest label, as
    the whole-frame merge did. Nothing is published until the whole pull has been read; a
    failure leaves the feedback, the quarantine file and the watermark as they were.
    """
    loop_dir.mkdir(parents=True, exist_ok=True)
    path = loop_dir / FEEDBACK
    with (
        FileLock(str(loop_dir.parent / ".loop.lock"), timeout=300),
        _staged(path) as staged,
        _staged(quarantine_dir / "feedback.csv") as bad_csv,
    ):
        state = read_state(loop_dir)
        # from before the watermark, de-duplicated by id: rows that share its timestamp or
        # were committed after the last pull read past their stamp are not missed
        after = state["watermark"] - LATENESS_S
        pull = _read_log(store, after, schema, chunk_rows, staged, bad_csv)
        if not pull.rows:
            total = pq.read_metadata(path).num_rows if path.exists() else 0
            return PullReport(0, 0, 0, total, state["watermark"])
        pulled = pa.table(
            {
                ID: pa.chunked_array(pull.ids, pa.large_string()),
                LABEL: pa.chunked_array(pull.labels, pa.int64()),
            }
        )
        old_rows, new, total = _changes(path, pulled, chunk_rows)
        if pull.quarantined:
            write_atomic(quarantine_dir / "feedback.csv", lambda p: os.replace(bad_csv, p))
        if new and not old_rows:  # the staged file is the whole result
            write_atomic(path, lambda p: os.replace(staged, p))
        elif new:
            write_atomic(path, lambda p: _rewrite(p, path, staged, pulled[ID], chunk_rows))
        # never back: the row at the watermark is read again (a label's stamp only grows)
        write_json_atomic(
            {
                "watermark": pull.watermark,
                "pulls": state["pulls"] + 1,
                "pulled_at": time.time(),
                # the rows of this pull that the next one reads again (`unpulled_labels`)
                "window_rows": pull.window_rows(),
                "window": pull.window(),
            },
            loop_dir / STATE,
        )
    report = PullReport(pull.rows, new, pull.quarantined, total, pull.watermark)
    log.info(
        "feedback pull: %d labelled rows read, %d new, %d in all",
        report.pulled,
        report.new,
        report.total_feedback,
    )
    return report


@dataclass
class _Pull:
    rows: int = 0  # read from the log, quarantined ones included
    quarantined: int = 0
    watermark: float = 0.0
    ids: list[pa.Array] = field(default_factory=list)  # of the clean rows, in log order
    labels: list[pa.Array] = field(default_factory=list)
    stamps: list[np.ndarray] = field(default_factory=list)  # labelled_at of every row read
    # (id, labelled_at) of the rows read within LATENESS_S of the newest so far (quarantined
    # ones too): the window the next pull reads again, None once it held over WINDOW_IDS
    recent: list[tuple[pa.Array, np.ndarray]] | None = field(default_factory=list)

    def window_rows(self) -> int:
        """The rows read that the next pull reads again: those labelled less than
        LATENESS_S before the watermark, or at it."""
        cut = self.watermark - LATENESS_S
        return int(sum(np.count_nonzero(s > cut) for s in self.stamps))

    def window(self) -> list[tuple[str, float]] | None:
        """[id, labelled_at] of those rows, or None where they were more than WINDOW_IDS."""
        if self.recent is None:
            return None
        return [
            (pid, at)
            for ids, stamps in self.recent
            for pid, at in zip(ids.to_pylist(), stamps.tolist(), strict=True)
        ]


def _read_log(
    store: PredictionStore,
    after: float,
    schema: Schema,
    chunk_rows: int,
    staged: Path,
    bad_csv: Path,
) -> _Pull:
    """Stream the labelled rows since `after` into `staged` (one row group per chunk of
    clean rows) and their quarantined rows into `bad_csv`, keeping only ids and labels."""
    pull, writer = _Pull(), None
    try:
        with contextlib.closing(store.labelled_chunks(after, chunk_rows)) as chunks:
            for part in chunks:
                writer = _take_chunk(part, schema, pull, writer, staged, bad_csv)
                del part  # not held while the next chunk is fetched
                log.debug("feedback pull: %d rows read", pull.rows)
    finally:
        if writer is not None:
            writer.close()
    return pull


def _take_chunk(
    part: Sequence,
    schema: Schema,
    pull: _Pull,
    writer: pq.ParquetWriter | None,
    staged: Path,
    bad_csv: Path,
) -> pq.ParquetWriter | None:
    """Validate one chunk: its clean rows become one row group of `staged` (the writer is
    opened on the first), its bad rows lines of `bad_csv`; `pull` counts them."""
    pull.rows += len(part)
    stamps = np.fromiter((r[3] for r in part), np.float64, len(part))
    pull.stamps.append(stamps)
    pull.watermark = max(pull.watermark, float(stamps.max()))
    if pull.recent is not None:  # rows stamped before the cut are outside the next window
        cut = pull.watermark - LATENESS_S  # the rows come in labelled_at order
        k = int(np.searchsorted(stamps, cut, "right"))
        fresh = (pa.array([r[0] for r in part[k:]], pa.large_string()), stamps[k:])
        pull.recent = [
            (ids[j:], at[j:])
            for ids, at in [*pull.recent, fresh]
            for j in [int(np.searchsorted(at, cut, "right"))]
            if j < len(at)
        ]
        if sum(len(at) for _, at in pull.recent) > WINDOW_IDS:
            pull.recent = None
    frame = _rows_to_frame(part, schema)
    result = validate_frame(frame.drop(columns=[ID]), schema, "prediction log")
    if len(result.quarantine):
        bad = result.quarantine.assign(**{ID: frame.loc[result.quarantine.index, ID]})
        _append_csv(bad, bad_csv, header=not pull.quarantined)
        pull.quarantined += len(bad)
    clean = result.clean
    if len(clean):
        clean.insert(0, ID, frame.loc[~frame.index.isin(result.quarantine.index), ID].to_numpy())
        table = pa.Table.from_pandas(clean, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(staged, table.schema, compression="zstd")
        writer.write_table(table)  # one row group
        pull.ids.append(table[ID].combine_chunks().cast(pa.large_string()))
        pull.labels.append(table[LABEL].combine_chunks())
    return writer


def _append_csv(frame: pd.DataFrame, path: Path, header: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, mode="w" if header else "a", header=header, index=False)


def _rows_to_frame(rows: Sequence, schema: Schema) -> pd.DataFrame:
    """(id, features blob, true_label, ...) rows -> id, label and feature columns."""
    features = decode_rows([r[1] for r in rows])
    if features.shape[1] != schema.n_features:
        raise ValueError(
            f"logged rows have {features.shape[1]} features, the dataset "
            f"{schema.n_features}: a model with another schema served them"
        )
    frame = pd.DataFrame(features, columns=list(schema.feature_names))
    frame.insert(0, LABEL, [r[2] for r in rows])
    frame.insert(0, ID, [r[0] for r in rows])
    return frame


def _changes(path: Path, pulled: pa.Table, chunk_rows: int) -> tuple[int, int, int]:
    """(rows in the feedback so far, rows added or re-labelled, rows in all) once `pulled`
    replaces the old rows of its ids: the old ids and labels are read a chunk at a time,
    each matched against the pull's ids."""
    old_rows, again, changed = 0, 0, 0
    if path.exists():
        batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=[ID, LABEL])
        for batch in batches:
            old_rows += batch.num_rows
            # where each old id is in the pull (null: not pulled again)
            at = pc.index_in(batch[ID].cast(pulled[ID].type), value_set=pulled[ID])
            hit = pc.is_valid(at)
            old_labels = batch[LABEL].filter(hit).cast(pa.int64())
            new_labels = pc.take(pulled[LABEL], at.filter(hit))
            again += len(old_labels)
            changed += pc.sum(pc.not_equal(old_labels, new_labels)).as_py() or 0
    added = pulled.num_rows - again
    return old_rows, added + changed, old_rows + added


def _rewrite(dest: Path, old: Path, staged: Path, pulled_ids: pa.ChunkedArray, chunk_rows: int):
    """The old rows whose ids were not pulled again, in their order, then the pulled rows:
    chunk by chunk, one row group each (the order the whole-frame merge gave)."""
    pulled = pq.ParquetFile(staged)
    schema = pulled.schema_arrow
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for batch in pq.ParquetFile(old).iter_batches(batch_size=chunk_rows):
            again = pc.is_in(batch[ID].cast(pulled_ids.type), value_set=pulled_ids)
            kept = batch.filter(pc.invert(again))
            if kept.num_rows:
                writer.write_table(pa.Table.from_batches([kept]).select(schema.names).cast(schema))
        for i in range(pulled.num_row_groups):
            writer.write_table(pulled.read_row_group(i))


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (same file system: it can be renamed over it), which
    is removed afterwards unless it was moved into place."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def training_frames(loop_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(bootstrap, feedback without ids) of the current data version, each example once."""
    bootstrap = pd.read_parquet(loop_dir / BOOTSTRAP)
    feedback = read_feedback(loop_dir)
    if feedback is None:
        return bootstrap, None
    feedback = feedback.drop(columns=[ID])
    features = [c for c in bootstrap.columns if c != LABEL]
    seen = set(content_hashes(bootstrap, features))
    hashes = content_hashes(feedback, features)
    # newest label wins among repeats within the feedback: keep each hash's last row
    last = ~pd.Series(hashes).duplicated(keep="last").to_numpy()
    fresh = last & ~np.isin(hashes, list(seen))
    if not fresh.all():
        log.info("%d feedback rows repeat an example already in the data", int((~fresh).sum()))
    return bootstrap, feedback.loc[fresh].reset_index(drop=True)


def content_hashes(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """One 64-bit hash per row of its feature values (as float32, the model's view)."""
    values = frame.loc[:, features].astype(np.float32)
    return pd.util.hash_pandas_object(values, index=False).to_numpy()
