"""The data stages as the CLI, DVC and the benches run them: each takes the in-memory path
(pipeline/ingest.py, pipeline/preprocess.py) or the streaming one (pipeline/chunks.py) by
the data's size, `data.streaming_above_rows`. Both write the same kind of outputs to the
same places, so every later stage reads either."""

from __future__ import annotations

from pathlib import Path

from pipeline import chunks
from pipeline import ingest as in_memory
from pipeline import preprocess as processing
from pipeline.config import MAX_INGEST_BYTES, Params
from pipeline.validate import Schema


def ingest(
    source: str,
    raw_dir: Path,
    quarantine_dir: Path,
    params: Params,
    name: str | None = None,
    schema: Schema | None = None,
    max_bytes: int = MAX_INGEST_BYTES,
    allow_schema_change: bool = False,
    download_dir: Path | None = None,
    check=None,
) -> in_memory.IngestReport:
    """`pipeline.ingest.ingest`, streamed for a file or directory of more rows than
    `data.streaming_above_rows` (whose memory is bounded by `data.chunk_rows`, so the
    in-memory byte limit `max_bytes` does not apply to it). `check` validates the chunks
    elsewhere (flows/data.py: on a Dask cluster)."""
    name = in_memory.check_name(name or params.data.name)
    if source_streams(source, params):
        files = in_memory.source_files(Path(source))
        return chunks.ingest_stream(
            source, files, raw_dir, quarantine_dir, params, name, schema, allow_schema_change,
            check,
        )  # fmt: skip
    return in_memory.ingest(
        source,
        raw_dir,
        quarantine_dir,
        params,
        name=name,
        schema=schema,
        max_bytes=max_bytes,
        allow_schema_change=allow_schema_change,
        download_dir=download_dir,
    )


def source_streams(source: str, params: Params) -> bool:
    """A file or directory of more rows than `data.streaming_above_rows`."""
    if source in ("digits", "mnist") or not Path(source).exists():
        return False
    files = in_memory.source_files(Path(source))
    return chunks.source_rows(files) > params.data.streaming_above_rows


def should_stream(raw: Path, params: Params) -> bool:
    """A snapshot without an official test split beside it, larger than the threshold."""
    import pyarrow.parquet as pq

    if in_memory.read_fixed_test(raw) is not None:
        return False
    return pq.ParquetFile(raw).metadata.num_rows > params.data.streaming_above_rows


def preprocess(raw: Path, out_dir: Path, params: Params, run_parts=None) -> dict:
    """`pipeline.preprocess.preprocess`, part by part for a snapshot larger than
    `data.streaming_above_rows` (each split then a directory of Parquet parts). `run_parts`
    runs the parts elsewhere (flows/data.py: on a Dask cluster)."""
    if not should_stream(raw, params):
        return processing.preprocess(raw, out_dir, params)
    key = processing.cache_key(in_memory.file_md5(raw), params, streamed=True)
    cached = processing.cached_report(out_dir, key)
    if cached is not None:
        return cached
    return chunks.preprocess_stream(raw, out_dir, params, key, run_parts)
