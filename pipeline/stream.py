"""The production stream: what the demo's simulated clients send, for any source.

`mlops run` holds out a seeded, stratified share of the source (everything but
`data.bootstrap_fraction`) before anything trains on it; the test split is carved from the
bootstrap pool, so it never meets the stream. Each round sends the next
`data.stream_per_round` share of the stream, and a cursor remembers how far it got: a second
`mlops run` in the same folder continues where the first stopped instead of replaying it.
Rows carry ids made from their position in the stream, so a retried or repeated send is
logged once.

    data/stream/stream.parquet   the held-out rows (label + features), not DVC-versioned
    data/stream/cursor.json      {"stream_hash": ..., "sent": rows already sent}
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.feedback import BOOTSTRAP, SOURCE
from pipeline.ingest import IngestReport, file_md5, ingest, write_json_atomic, write_parquet_atomic
from pipeline.validate import LABEL, Schema

log = logging.getLogger(__name__)

STREAM_FILE, CURSOR_FILE = "stream.parquet", "cursor.json"


def hold_out(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bootstrap pool, production stream): a seeded split, stratified on the label when
    every class has two rows or more (as `load_digits_frame` splits the digits)."""
    from sklearn.model_selection import train_test_split

    counts = frame[LABEL].value_counts()
    stratify = frame[LABEL] if len(counts) > 1 and counts.min() >= 2 else None
    boot, stream = train_test_split(
        frame, train_size=fraction, stratify=stratify, random_state=seed
    )
    return boot.reset_index(drop=True), stream.reset_index(drop=True)


def save(stream: pd.DataFrame, stream_dir: Path) -> str:
    """Write the stream; a stream with other contents than the last one restarts the cursor.
    Returns the stream's hash."""
    path = stream_dir / STREAM_FILE
    write_parquet_atomic(stream, path)
    digest = file_md5(path)
    cursor = read_cursor(stream_dir)
    if cursor["stream_hash"] != digest:
        if cursor["sent"]:
            log.info("a new production stream: its cursor starts again at 0")
        write_json_atomic({"stream_hash": digest, "sent": 0}, stream_dir / CURSOR_FILE)
    return digest


def read_cursor(stream_dir: Path) -> dict:
    path = stream_dir / CURSOR_FILE
    return json.loads(path.read_text()) if path.exists() else {"stream_hash": None, "sent": 0}


@dataclass(frozen=True)
class Chunk:
    """Rows [start, start + size) of the stream: one round's traffic."""

    stream_hash: str
    start: int
    size: int

    def ids(self) -> list[str]:
        """Client ids from the position in the stream: the same row, the same id."""
        return [f"stream-{self.stream_hash[:10]}-{self.start + k}" for k in range(self.size)]


def plan(stream_dir: Path, rounds: int, per_round: float) -> list[Chunk | None]:
    """This run's chunks, continuing after the cursor; None for a round the used-up stream
    cannot feed."""
    cursor = read_cursor(stream_dir)
    total = len(pd.read_parquet(stream_dir / STREAM_FILE, columns=[LABEL]))
    size = max(1, math.ceil(total * per_round))
    chunks: list[Chunk | None] = []
    start = cursor["sent"]
    for _ in range(rounds):
        n = min(size, total - start)
        chunks.append(Chunk(cursor["stream_hash"], start, n) if n > 0 else None)
        start += max(n, 0)
    if chunks and chunks[-1] is None:
        log.warning(
            "the production stream is used up (%d of %d rows sent): rounds without traffic "
            "train on the data they have; ingest new data to go on",
            cursor["sent"],
            total,
        )
    return chunks


def rows(
    stream_dir: Path, chunk: Chunk, schema: Schema, drift: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a chunk; with `drift`, a distortion the drift check must see."""
    frame = pd.read_parquet(stream_dir / STREAM_FILE).iloc[chunk.start : chunk.start + chunk.size]
    x = frame.loc[:, list(schema.feature_names)].to_numpy(np.float32)
    y = frame[LABEL].to_numpy()
    return (distort(x, schema) if drift else x), y


def distort(x: np.ndarray, schema: Schema) -> np.ndarray:
    """Images shift right by a quarter of their side (zeros shifted in); other tables move
    every feature by twice its spread."""
    if schema.image_side:
        side = schema.image_side
        shift = max(1, side // 4)
        images = x.reshape(-1, side, side)
        shifted = np.zeros_like(images)
        shifted[:, :, shift:] = images[:, :, :-shift]
        return shifted.reshape(len(x), -1)
    return x + 2 * x.std(axis=0, keepdims=True)


def advance(stream_dir: Path, chunk: Chunk) -> None:
    """Record that the chunk was sent (and answered)."""
    cursor = read_cursor(stream_dir)
    if cursor["stream_hash"] == chunk.stream_hash:
        sent = max(cursor["sent"], chunk.start + chunk.size)
        write_json_atomic(
            {"stream_hash": chunk.stream_hash, "sent": sent}, stream_dir / CURSOR_FILE
        )


def ingest_with_stream(
    source: str,
    loop_dir: Path,
    stream_dir: Path,
    quarantine_dir: Path,
    params: Params,
    max_bytes: int,
    allow_schema_change: bool = False,
    download_dir: Path | None = None,
) -> IngestReport:
    """The loop's ingest: validate the whole source, hold out the production stream, and
    snapshot the rest as the bootstrap pool (data/loop/bootstrap.parquet)."""
    held: dict[str, int] = {}

    def keep_pool(clean: pd.DataFrame) -> pd.DataFrame:
        pool, stream = hold_out(clean, params.data.bootstrap_fraction, params.seed)
        save(stream, stream_dir)
        held["rows"] = len(stream)
        return pool

    report = ingest(
        source,
        loop_dir,
        quarantine_dir,
        params,
        name=BOOTSTRAP.removesuffix(".parquet"),
        max_bytes=max_bytes,
        keep=keep_pool,
        allow_schema_change=allow_schema_change,
        download_dir=download_dir,
    )
    write_json_atomic(
        {
            "source": source,
            "source_hash": report.source_hash,
            "schema_change": report.schema_change,
        },
        loop_dir / SOURCE,
    )
    log.info(
        "%d rows held out as the production stream, %d in the bootstrap pool",
        held["rows"],
        report.rows_ok,
    )
    return report
