"""The streaming data stages on a Dask cluster, through Prefect's own Dask task runner
(prefect-dask): each part of the snapshot (one row group) is split and summarised by a
Prefect task on a Dask worker, which writes its Parquet parts straight to the shared data
directory; this process combines the parts' statistics into the preprocessor.

The work per part is `pipeline.chunks.process_part`, the very function the single-process
path runs, so both put every row in the same split and fit the same preprocessor
(tests/flows/test_data_dask.py). Workers must see the data directory at the same path (one
machine, or a shared volume as in docker-compose.yml).

    MLOPS_DASK_ADDRESS=tcp://127.0.0.1:8786 mlops preprocess   # a running cluster
    mlops preprocess --dask-workers 2                          # a LocalCluster for this run
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from pipeline import stages
from pipeline.chunks import PartResult, process_part
from pipeline.config import Params


@task(retries=2, retry_delay_seconds=[2, 5], task_run_name="split-part-{index}")
def split_part(
    raw: str, index: int, offset: int, out_dir: str, params: dict, keep: int
) -> PartResult:
    """One row group: its rows to their splits' parts, its training rows' moments back."""
    return process_part(
        Path(raw), index, offset, Path(out_dir), Params.model_validate(params), keep
    )


@flow(name="preprocess-dask", log_prints=False)
def preprocess_on_dask(raw: str, out_dir: str, params: dict) -> dict:
    """Split and fit a large snapshot part by part on the flow's Dask task runner."""
    parsed = Params.model_validate(params)

    def run_parts(parts: list[tuple[int, int]], staging: Path, keep: int) -> Iterator[PartResult]:
        futures = [
            split_part.submit(raw, index, offset, str(staging), params, keep)
            for index, offset in parts
        ]
        for future in futures:
            yield future.result()

    return stages.preprocess(Path(raw), Path(out_dir), parsed, run_parts)


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
        str(raw), str(out_dir), params.model_dump()
    )
