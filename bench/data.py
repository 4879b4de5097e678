"""Data-side scale benchmark: N rows x 64 features through ingest -> validate -> split ->
preprocessor fit, for each N (default 1M, 4M and 16M), in one run.

Arms, each in a fresh process whose whole process tree is sampled for peak RSS:
- `in-memory`: today's path (pipeline/ingest.py + pipeline/preprocess.py, the whole source in
  pandas), at 1M rows only (its memory grows with the rows: the point of the others);
- `streaming`: pipeline/stages.py forced onto the chunked path (`data.chunk_rows` rows at a
  time), one process;
- `dask`: the source's row groups validated, then the snapshot's parts split and summarised,
  on a Dask LocalCluster of 2 worker processes (one per stage) through Prefect's Dask task
  runner (flows/data.py), reporting to a Prefect server the bench starts;
- `read` (the baseline, same run): pyarrow reading the source into pandas, the floor for any
  ingest and what one in-memory copy costs.

Checks printed with the figures: the Dask arm's snapshot is the streaming arm's byte for
byte, its splits hold exactly the same rows (part by part) and its preprocessor is the same.
The source is generated in row groups (its generation is bounded too), and every file is
deleted after its size's arms.

    python bench/data.py [--rows 1000000 4000000 16000000] [--chunk-rows 65536]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _make(path: Path, rows: int, block: int = 1_000_000) -> None:
    """Digits-like rows: integer pixels 0-16 as float32, labels 0-9, written a block at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, block):
        n = min(block, rows - start)
        columns = {"label": pa.array(rng.integers(0, 10, n))}
        pixels = rng.integers(0, 17, (n, 64)).astype(np.float32)
        for i in range(64):
            columns[f"pixel{i}"] = pa.array(pixels[:, i])
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=65_536)
    assert writer is not None
    writer.close()


# --- the arms (run as `python bench/data.py --arm NAME SOURCE WORKDIR CHUNK`) ----------------


def _arm(name: str, source: str, work: str, chunk_rows: int) -> dict:
    from pipeline.config import Params

    params = Params.model_validate(
        {"data": {"streaming_above_rows": 1_000, "chunk_rows": chunk_rows}}
    )
    work_dir = Path(work)
    if name == "read":
        import pyarrow.parquet as pq

        pq.read_table(source).to_pandas()
        return {"done": time.perf_counter()}
    if name == "in-memory":
        from pipeline.ingest import ingest
        from pipeline.preprocess import preprocess

        big = params.model_copy(
            update={"data": params.data.model_copy(update={"streaming_above_rows": 10**12})}
        )
        report = ingest(source, work_dir / "raw", work_dir / "q", big, max_bytes=10**12)
        preprocess(Path(report.snapshot), work_dir / "processed", big)
        return {"done": time.perf_counter()}
    from pipeline import stages

    if name == "streaming":
        report = stages.ingest(source, work_dir / "raw", work_dir / "q", params)
        ingest_done = time.perf_counter()
        stages.preprocess(Path(report.snapshot), work_dir / "processed", params)
    else:
        from flows.data import ingest_dask, preprocess_dask

        report = ingest_dask(source, work_dir / "raw", work_dir / "q", params, workers=2)
        ingest_done = time.perf_counter()
        preprocess_dask(Path(report.snapshot), work_dir / "processed", params, workers=2)
    return {"ingest_s": ingest_done, "done": time.perf_counter()}


def _sample_tree(pid: int, peaks: dict[int, tuple[str, int]], stop: threading.Event) -> None:
    """Peak RSS of the process and of every descendant (Dask's nannies, workers, and
    Prefect's temporary server), sampled every 50 ms."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                role = _role(proc.cmdline())
            except psutil.Error:
                continue
            if rss > peaks.get(proc.pid, ("", 0))[1]:
                peaks[proc.pid] = (role, rss)
        stop.wait(0.05)


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "--arm" in text:
        return "driver"
    if "prefect" in text and "server" in text or "uvicorn" in text:
        return "prefect-server"
    if "multiprocessing" in text or "spawn_main" in text or "forkserver" in text:
        return "dask-worker"
    return "other"


def _measure(name: str, source: Path, work: Path, chunk_rows: int, api_url: str) -> dict:
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    out_file = work / "arm.json"
    cmd = [sys.executable, __file__, "--arm", name, str(source), str(work), str(chunk_rows)]
    start = time.perf_counter()
    with (work / "arm.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_file.open("w"), stderr=log,
                                start_new_session=True)  # fmt: skip
        peaks: dict[int, tuple[str, int]] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, peaks, stop), daemon=True)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)  # anything the arm left behind
    if proc.returncode:
        sys.stderr.write((work / "arm.log").read_text()[-5000:])
        raise SystemExit(f"arm {name} failed ({proc.returncode})")
    out = out_file.read_text()
    marks = json.loads(out.strip().splitlines()[-1])
    by_role: dict[str, list[int]] = {}
    for role, rss in peaks.values():
        by_role.setdefault(role, []).append(rss)
    return {
        "wall_s": seconds,  # with the interpreter's start and imports
        "seconds": marks["done"],  # the stages alone, as the arm timed them
        "inner": marks,
        "driver_gib": max(by_role.get("driver", [0])) / GIB,
        "worker_gib": max(by_role.get("dask-worker", [0])) / GIB,
        "workers": len(by_role.get("dask-worker", [])),
        "server_gib": max(by_role.get("prefect-server", [0])) / GIB,
    }


def _same_output(a: Path, b: Path) -> bool:
    import pandas as pd

    from pipeline.preprocess import PREPROCESSOR_FILE, SPLITS, split_path

    for split in SPLITS:
        parts_a = sorted(split_path(a, split).iterdir())
        parts_b = sorted(split_path(b, split).iterdir())
        if [p.name for p in parts_a] != [p.name for p in parts_b]:
            return False
        for x, y in zip(parts_a, parts_b, strict=True):
            if not pd.read_parquet(x).equals(pd.read_parquet(y)):
                return False
    from pipeline.ingest import file_md5

    same_snapshot = file_md5(a.parent / "raw" / "dataset.parquet") == file_md5(
        b.parent / "raw" / "dataset.parquet"
    )
    return (
        same_snapshot and (a / PREPROCESSOR_FILE).read_text() == (b / PREPROCESSOR_FILE).read_text()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--arm", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        name, source, work, chunk = args.arm
        import pyarrow.parquet  # noqa: F401 - imports before the clock: the stages alone count

        import pipeline.stages  # noqa: F401

        if name == "dask":
            import flows.data  # noqa: F401
        start = time.perf_counter()
        marks = _arm(name, source, work, int(chunk))
        print(json.dumps({k: v - start for k, v in marks.items()}))
        return
    print(f"{'rows':>11} {'arm':>10} {'s':>7} {'rows/s':>9} {'ingest s':>8} {'driver GiB':>10} "
          f"{'worker GiB':>10} {'vs read s':>9} {'vs read RSS':>11}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="mlops-bench-prefect-") as home:
        server, api_url = _prefect_server(Path(home))
        try:
            for rows in args.rows:
                results.append(_size(rows, args.chunk_rows, api_url))
        finally:
            server.stop()
    streaming = [next(r for r in results if r["rows"] == n)["streaming"] for n in args.rows]
    flat = max(s["driver_gib"] for s in streaming) / min(s["driver_gib"] for s in streaming)
    same = all(r["dask"]["same_as_streaming"] for r in results)
    print(f"streaming peak RSS, largest / smallest size: {flat:.2f} (target <= 1.20)")
    print(f"dask snapshot, splits and preprocessor identical to the streaming path's: {same}")


def _prefect_server(home: Path):
    """A Prefect server of the bench's own (the arms' flow runs report to it)."""
    from pipeline import process

    port = process.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}  # fmt: skip
    prefect = str(Path(sys.executable).parent / "prefect")
    cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = process.start(cmd, url, home / "server.log", env=env)
    server.wait_healthy("/health")
    return server, url


def _size(rows: int, chunk_rows: int, api_url: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlops-bench-data-") as tmp:
        source = Path(tmp) / "source.parquet"
        _make(source, rows)
        arms = ["read", "in-memory", "streaming", "dask"] if rows <= 1_000_000 else [
            "read", "streaming", "dask"]  # fmt: skip
        got = {}
        for arm in arms:
            work = Path(tmp) / arm
            work.mkdir()
            got[arm] = _measure(arm, source, work, chunk_rows, api_url)
            if arm == "dask":
                got[arm]["same_as_streaming"] = _same_output(
                    Path(tmp) / "streaming" / "processed", work / "processed"
                )
            if arm not in ("streaming", "dask"):
                shutil.rmtree(work)
        base = got["read"]
        for arm in arms:
            r = got[arm]
            ingest_s = r["inner"].get("ingest_s")
            print(f"{rows:>11,} {arm:>10} {r['seconds']:>7.1f} {rows / r['seconds']:>9,.0f} "
                  f"{ingest_s if ingest_s is None else round(ingest_s, 1)!s:>8} "
                  f"{r['driver_gib']:>10.2f} {r['worker_gib']:>10.2f} "
                  f"{r['seconds'] / base['seconds']:>9.1f} "
                  f"{r['driver_gib'] / base['driver_gib']:>11.2f}", flush=True)  # fmt: skip
        return {"rows": rows, **got}


if __name__ == "__main__":
    main()
