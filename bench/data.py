"""Data-side scale benchmark: 1,000,000 rows x 64 features through ingest -> validate -> preprocess.

Prints rows/s and peak RSS of the whole path, and its ratio to a baseline measured in
the same run: reading the same Parquet file with pyarrow alone (the floor for any ingest).
Targets on a 2-core machine: under 30 s and under 3 GiB peak RSS.

    python bench/data.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _make(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    columns = {"label": pa.array(rng.integers(0, 10, rows))}
    for i in range(64):
        columns[f"pixel{i}"] = pa.array(rng.integers(0, 17, rows).astype(np.float32))
    pq.write_table(pa.table(columns), path)


def _baseline(path: str, queue: mp.Queue) -> None:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    pq.read_table(path).to_pandas()
    queue.put((time.perf_counter() - start, _peak_rss()))


def _full(path: str, root: str, queue: mp.Queue) -> None:
    from pipeline.config import load_params
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess

    params = load_params(Path("params.yaml"))
    start = time.perf_counter()
    report = ingest(path, Path(root) / "raw", Path(root) / "quarantine", params)
    preprocess(Path(report.snapshot), Path(root) / "processed", params)
    queue.put((time.perf_counter() - start, _peak_rss()))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes on Linux


def _measure(target, *args) -> tuple[float, int]:
    """Run in a fresh process so each peak RSS is that path's alone."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "big.parquet"
        _make(source, args.rows)
        base_s, base_rss = _measure(_baseline, str(source))
        full_s, full_rss = _measure(_full, str(source), tmp)
    gib = 1024**3
    result = {
        "rows": args.rows,
        "baseline_read_s": round(base_s, 2),
        "baseline_peak_rss_gib": round(base_rss / gib, 2),
        "ingest_validate_preprocess_s": round(full_s, 2),
        "rows_per_s": round(args.rows / full_s),
        "peak_rss_gib": round(full_rss / gib, 2),
        "time_ratio_vs_read": round(full_s / base_s, 1),
        "rss_ratio_vs_read": round(full_rss / base_rss, 1),
        "target_met": full_s < 30 and full_rss < 3 * gib,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
