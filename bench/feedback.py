"""Feedback pull at volume: the chunked pull (pipeline/feedback.py) against one query, on a
prediction log of `--rows` labelled rows in a fresh PostgreSQL database, one run.

The log is written with COPY (64 digit-like features, 0..16, and 10 probabilities per row,
every row labelled). Each contender runs in a fresh Python process, so its peak RSS
(VmHWM) is its own; both write the feedback Parquet file to their own directory and the
files are compared. The baseline is the read the pull used to make: one query for all the
rows (pandas.read_sql), the features decoded, validated and written in one piece. Then one
row in 100 gets a new label and the chunked pull runs again: it rewrites the file it made
(old rows streamed row group by row group, the re-labelled ones replaced).
The database is dropped at the end, the files removed.

    python bench/feedback.py [--rows 1000000] [--chunk-rows 65536] [--admin postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADMIN = os.environ.get("MLOPS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
N_FEATURES, N_CLASSES = 64, 10
COPY_BATCH = 50_000  # rows made (and held) at a time while the log is written


def fill_log(url: str, rows: int, seed: int = 0) -> None:
    """`rows` labelled predictions, ids in time order, labels arriving in that order."""
    import psycopg

    from pipeline.store import COLUMNS, PredictionStore, encode_rows, new_ids

    PredictionStore(url).create().dispose()
    rng = np.random.default_rng(seed)
    columns = (*COLUMNS, "true_label", "labelled_at")
    t0 = time.time() - rows * 1e-3
    with psycopg.connect(url.replace("+psycopg", "")) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY predictions ({', '.join(columns)}) FROM STDIN") as copy:
            for start in range(0, rows, COPY_BATCH):
                n = min(COPY_BATCH, rows - start)
                x = rng.integers(0, 17, (n, N_FEATURES)).astype(np.float32)
                probs = rng.dirichlet(np.ones(N_CLASSES), n).astype(np.float32)
                truth = rng.integers(0, N_CLASSES, n)
                at = t0 + (start + np.arange(n)) * 1e-3
                served = probs.argmax(axis=1)
                for row in zip(
                    new_ids(n), at, encode_rows(x), served, encode_rows(probs), truth, strict=True
                ):
                    i, t, f, label, p, y = row
                    copy.write_row((i, t, "bench", "1", f, int(label), p, 1.0, int(y), t))
        conn.execute("ANALYZE predictions")


def relabel(url: str, every: int = 100) -> None:
    """A new label, given later, for one row in `every`, spread over the whole log."""
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            "UPDATE predictions SET true_label = (true_label + 1) %% %s, "
            "labelled_at = labelled_at + 1e6 WHERE abs(hashtext(id)) %% %s = 0",
            (N_CLASSES, every),
        )


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(kind: str, url: str, out: Path, chunk_rows: int) -> dict:
    """One contender, in this (fresh) process: its time and memory as a dict."""
    import pandas as pd

    from pipeline.feedback import ID, pull_feedback
    from pipeline.ingest import write_parquet_atomic
    from pipeline.store import PredictionStore, decode_rows, labelled_query
    from pipeline.validate import LABEL, Schema, validate_frame

    schema = Schema(tuple(f"pixel{i}" for i in range(N_FEATURES)), N_CLASSES)
    store = PredictionStore(url)
    with store.engine.connect() as conn:  # connected and imported before the clock starts
        conn.exec_driver_sql("SELECT 1")
    rss_before = _rss_kib("VmRSS")
    start = time.perf_counter()
    if kind == "chunked":
        rows = pull_feedback(store, out / "loop", schema, out / "q", chunk_rows).pulled
    else:
        with store.engine.connect() as conn:
            found = pd.read_sql(labelled_query(-1.0), conn)
        frame = pd.DataFrame(
            decode_rows(found["features"].tolist()), columns=list(schema.feature_names)
        )
        frame.insert(0, LABEL, found["true_label"].to_numpy())
        result = validate_frame(frame, schema, "prediction log")
        clean = result.clean
        clean.insert(0, ID, found.loc[~found.index.isin(result.quarantine.index), "id"].to_numpy())
        write_parquet_atomic(clean, out / "loop" / "feedback.parquet")
        rows = len(found)
    seconds = time.perf_counter() - start
    store.dispose()
    return {
        "rows": rows,
        "seconds": seconds,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _rss_kib("VmHWM") / 1024,
    }


def run_worker(kind: str, url: str, out: Path, chunk_rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--url", url, "--out", str(out)]
    cmd += ["--chunk-rows", str(chunk_rows)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    return pq.read_table(a).equals(pq.read_table(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=None, help="params' data.chunk_rows")
    parser.add_argument("--admin", default=ADMIN, help="a database on the server to connect to")
    parser.add_argument("--worker", choices=["chunked", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from pipeline.store import CHUNK_ROWS

    chunk_rows = args.chunk_rows or CHUNK_ROWS
    if args.worker:
        print(json.dumps(worker(args.worker, args.url, args.out, chunk_rows)))
        return

    import psycopg

    from pipeline.config import sqlalchemy_url

    name = f"mlops_bench_{uuid.uuid4().hex[:10]}"
    url = sqlalchemy_url(args.admin.rsplit("/", 1)[0] + f"/{name}")
    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    with psycopg.connect(args.admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        t = time.perf_counter()
        fill_log(url, args.rows)
        print(f"log: {args.rows:,} labelled rows written in {time.perf_counter() - t:.1f} s")
        found = {
            kind: run_worker(kind, url, work / kind, chunk_rows) for kind in ("baseline", "chunked")
        }
        same = same_files(*(work / k / "loop" / "feedback.parquet" for k in found))
        relabel(url)  # then a second pull rewrites the file it made, chunk by chunk
        again = run_worker("chunked", url, work / "chunked", chunk_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(args.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"\n{args.rows:,} rows, chunk_rows {chunk_rows:,}; each in a fresh process")
    print(f"{'':10} {'seconds':>8} {'rows/s':>10} {'RSS before (MiB)':>17} {'peak RSS (MiB)':>15}")
    for kind, r in found.items():
        print(
            f"{kind:10} {r['seconds']:8.1f} {r['rows'] / r['seconds']:10,.0f} "
            f"{r['rss_before_mib']:17.0f} {r['peak_rss_mib']:15.0f}"
        )
    print(
        f"{'2nd pull':10} {again['seconds']:8.1f} {'-':>10} "
        f"{again['rss_before_mib']:17.0f} {again['peak_rss_mib']:15.0f}"
        f"   ({again['rows']:,} re-labelled rows, the file rewritten)"
    )
    c, b = found["chunked"], found["baseline"]
    grew = {k: r["peak_rss_mib"] - r["rss_before_mib"] for k, r in found.items()}
    print(
        f"chunked / baseline: time {c['seconds'] / b['seconds']:.2f}x, peak RSS "
        f"{c['peak_rss_mib'] / b['peak_rss_mib']:.2f}x (above the imports: "
        f"{grew['chunked'] / grew['baseline']:.2f}x)"
    )
    print(f"identical feedback files: {same}")


if __name__ == "__main__":
    main()
