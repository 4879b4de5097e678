"""The streaming data stages on a Dask cluster, through Prefect's own Dask task runner
(prefect-dask), each part a Prefect task on a Dask worker:

- ingest: each row group of a Parquet source is read and validated on a worker
  (`pipeline.chunks.check_row_group`); this process writes the clean rows to the snapshot
  in order, so the snapshot is the single-process path's, byte for byte;
- preprocess: each row group of the snapshot is split and summarised on a worker
  (`pipeline.chunks.process_part`), which writes its Parquet parts straight to the shared
  data directory; this process combines the parts' statistics into the preprocessor.

The work per part is the very function the single-process path runs, so both put every row
in the same split and fit the same preprocessor (tests/flows/test_data_dask.py). Workers
must see the data directory at the same path (one machine, or a shared volume as in
docker-compose.yml).

    MLOPS_DASK_ADDRESS=tcp://127.0.0.1:8786 mlops ingest --source big/   # a running cluster
    mlops preprocess --dask-workers 2                    # a LocalCluster for this run
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from pipeline import stages
from pipeline.chunks import (
    Checked,
    PartResult,
    check_file,
    check_row_group,
    is_parquet,
    process_part,
)
from pipeline.config import Params
from pipeline.ingest import IngestReport
from pipeline.validate import Schema


@task(retries=2, retry_delay_seconds=[2, 5], task_run_name="split-part-{index}")
def split_part(
    raw: str, index: int, offset: int, out_dir: str, params: dict, keep: int
) -> PartResult:
    """One row group: its rows to their splits' parts, its training rows' moments back."""
    return process_part(
        Path(raw), index, offset, Path(out_dir), Params.model_validate(params), keep
    )


@flow(name="preprocess-dask", log_prints=False)
def preprocess_on_dask(raw: str, out_dir: str, params: dict, window: int = 4) -> dict:
    """Split and fit a large snapshot part by part on the flow's Dask task runner."""
    parsed = Params.model_validate(params)

    def run_parts(parts: list[tuple[int, int]], staging: Path, keep: int) -> Iterator[PartResult]:
        futures: deque = deque()  # at most `window` parts in flight, their results let go
        for index, offset in parts:
            futures.append(split_part.submit(raw, index, offset, str(staging), params, keep))
            if len(futures) >= window:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()

    return stages.preprocess(Path(raw), Path(out_dir), parsed, run_parts)


@task(retries=2, retry_delay_seconds=[2, 5], task_run_name="check-file-{file}-part-{group}")
def check_part(
    path: str, file: int, group: int, schema: dict, chunk_rows: int, first: bool, staging: str
) -> list[Checked]:
    """One row group of a Parquet source, validated chunk by chunk, its rows staged."""
    return check_row_group(
        Path(path), file, group, Schema.from_dict(schema), chunk_rows, first, Path(staging)
    )


def _check_on_dask(window: int):
    """Parquet sources' row groups validated on the cluster, at most `window` in flight (the
    driver holds their clean rows until it writes them), yielded in order; a CSV source,
    which cannot be cut without reading it, is validated here."""
    import pyarrow.parquet as pq

    def check(
        files: list[Path], schema: Schema, chunk_rows: int, staging: Path
    ) -> Iterator[Checked]:
        for file, path in enumerate(files):
            if not is_parquet(path):
                yield from check_file(path, file, schema, chunk_rows)
                continue
            meta = pq.ParquetFile(path).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            first = next((g for g, n in enumerate(sizes) if n), 0)  # where the header is hashed
            futures: deque = deque()
            for group in range(len(sizes)):
                futures.append(
                    check_part.submit(
                        str(path.resolve()),
                        file,
                        group,
                        schema.to_dict(),
                        chunk_rows,
                        group == first,
                        str(staging.resolve()),
                    )  # fmt: skip
                )
                if len(futures) >= window:
                    yield from futures.popleft().result()
            while futures:
                yield from futures.popleft().result()

    return check


@flow(name="ingest-dask", log_prints=False)
def ingest_on_dask(
    source: str, raw_dir: str, quarantine_dir: str, params: dict, name: str | None = None,
    allow_schema_change: bool = False, window: int = 4,
) -> dict:  # fmt: skip
    """Validate a large source's parts on the flow's Dask task runner; write the snapshot."""
    report = stages.ingest(
        source, Path(raw_dir), Path(quarantine_dir), Params.model_validate(params), name=name,
        allow_schema_change=allow_schema_change, check=_check_on_dask(window),
    )  # fmt: skip
    return report.to_dict()


def ingest_dask(
    source: str,
    raw_dir: Path,
    quarantine_dir: Path,
    params: Params,
    name: str | None = None,
    allow_schema_change: bool = False,
    address: str | None = None,
    workers: int = 2,
) -> IngestReport:
    """`pipeline.stages.ingest` with the validation of a large source's parts on Dask."""
    runner = task_runner(address, workers)
    report = ingest_on_dask.with_options(task_runner=runner)(
        source, str(raw_dir), str(quarantine_dir), params.model_dump(), name, allow_schema_change,
        _window(address, workers),
    )  # fmt: skip
    return IngestReport(**report)


def _window(address: str | None, workers: int) -> int:
    """Parts in flight: two per local worker, 16 on a running cluster (each holds only
    counts and 8 bytes of row hash per row here: the rows are staged as files)."""
    return 2 * workers if address is None else 16


def task_runner(address: str | None, workers: int = 2) -> DaskTaskRunner:
    """A running cluster's scheduler, or a LocalCluster of `workers` single-threaded
    processes for this run (no dashboard: nothing listens beyond the workers' ports)."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "host": "127.0.0.1",
        },
    )


def preprocess_dask(
    raw: Path, out_dir: Path, params: Params, address: str | None = None, workers: int = 2
) -> dict:
    """`pipeline.stages.preprocess` with its parts run on Dask."""
    runner = task_runner(address, workers)
    return preprocess_on_dask.with_options(task_runner=runner)(
        str(raw), str(out_dir), params.model_dump(), _window(address, workers)
    )
