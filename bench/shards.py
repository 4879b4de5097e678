"""Training from shards against the in-memory training split: one epoch's worth of batches.

Writes a Parquet file of N rows x 64 float32 features + label (row groups of 65,536 rows, zstd,
as the streaming stages write their parts), then, each in a fresh process:
- `memory`: what training does today: the split loaded and standardised as SplitData.load
  does (pandas, `features_labels`, `Preprocessor.transform`), then one epoch of seeded
  mini-batches indexed from the tensors (pipeline/train.py);
- `shards`: one epoch through pipeline/shards.py's ShardDataset (read a chunk at a time,
  standardised, through the shuffle buffer, batched), in process as training reads it;
- `shards-2-workers` (with `--workers 2`): the same through a DataLoader with 2 workers.

Printed per arm: seconds, rows/s, and the peak RSS of the process (resource.getrusage; the
workers' own peak beside it), with the ratios of the shard arms to `memory`. The file is
deleted at the end.

    python bench/shards.py [--rows 1000000] [--batch-size 32] [--shuffle-buffer 65536]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 64
ROW_GROUP = 65_536
MIB = 1024**2


def make_source(path: Path, rows: int) -> None:
    """Random float32 features and labels 0-9, generated and written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        features = rng.normal(3.0, 2.0, (n, FEATURES)).astype(np.float32)
        columns = {"label": pa.array(rng.integers(0, 10, n))}
        columns |= {f"x{i}": pa.array(features[:, i]) for i in range(FEATURES)}
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


def save_preprocessor(source: Path, path: Path) -> None:
    """A preprocessor fitted on the first row group (the figures do not depend on it)."""
    import pyarrow.parquet as pq

    from pipeline.preprocess import Preprocessor, features_labels
    from pipeline.validate import Schema

    first = pq.ParquetFile(source).read_row_group(0).to_pandas()
    schema = Schema(tuple(f"x{i}" for i in range(FEATURES)), 10)
    Preprocessor.fit(features_labels(first, schema)[0], schema, "feature").save(path)


# --- the arms (run as `python bench/shards.py --arm NAME SOURCE PREPROCESSOR ...`) ---------


def peak_rss(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def run_arm(name: str, source: Path, pre_path: Path, batch_size: int, buffer: int) -> dict:
    import torch

    from pipeline.preprocess import Preprocessor

    pre = Preprocessor.load(pre_path)
    before = peak_rss()
    start = time.perf_counter()
    rows, batches = 0, 0
    if name == "memory":
        import pandas as pd

        from pipeline.train import SplitData

        data = SplitData.from_frames({"train": pd.read_parquet(source)}, pre)
        loaded = time.perf_counter() - start
        x, y = torch.from_numpy(data.x["train"]), torch.from_numpy(data.y["train"])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        for idx in order.split(batch_size):
            _xb, yb = x[idx], y[idx]
            rows, batches = rows + len(yb), batches + 1
    else:
        from torch.utils.data import DataLoader

        from pipeline.shards import ShardDataset

        ds = ShardDataset(source, pre, batch_size, buffer, seed=0, rank=0, world_size=1)
        ds.set_epoch(1)
        workers = int(name.split("-")[1]) if "-" in name else 0
        stream = DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
        loaded = 0.0
        for _xb, yb in stream:
            rows, batches = rows + len(yb), batches + 1
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "batches": batches,
        "seconds": seconds,
        "load_s": loaded,
        "rss_before": before,
        "rss_peak": peak_rss(),
        "workers_rss_peak": peak_rss(resource.RUSAGE_CHILDREN),
    }


def measure(name: str, source: Path, pre: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--arm", name, str(source), str(pre)]
    cmd += ["--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"arm {name} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], rows: int) -> None:
    base = results["memory"]
    print(f"\n{rows:,} rows x {FEATURES} features, one epoch of batches:")
    print(f"{'arm':<18}{'seconds':>9}{'rows/s':>12}{'peak RSS':>11}{'workers':>10}  vs memory")
    for name, r in results.items():
        assert r["rows"] == rows, (name, r["rows"])
        rate = r["rows"] / r["seconds"]
        workers = f"{r['workers_rss_peak'] / MIB:,.0f} MiB" if r["workers_rss_peak"] else "-"
        ratio = ""
        if name != "memory":
            speed = rate / (base["rows"] / base["seconds"])
            ratio = f"{speed:.2f}x rows/s, {r['rss_peak'] / base['rss_peak']:.2f}x RSS"
        print(
            f"{name:<18}{r['seconds']:>8.2f}s{rate:>12,.0f}"
            f"{r['rss_peak'] / MIB:>7,.0f} MiB{workers:>10}  {ratio}"
        )
    print(
        f"(memory: {base['load_s']:.2f} s of it loading and standardising; every arm starts "
        f"at ~{base['rss_before'] / MIB:,.0f} MiB RSS after its imports)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=32)  # params.yaml's train.batch_size
    parser.add_argument("--shuffle-buffer", type=int, default=65_536)
    parser.add_argument("--workers", type=int, default=0, help="also a DataLoader arm")
    parser.add_argument("--dir", type=Path, help="where the file goes (default: temp)")
    parser.add_argument("--arm", nargs=3, metavar=("NAME", "SOURCE", "PREPROCESSOR"))
    args = parser.parse_args()
    if args.arm:
        name, source, pre = args.arm
        result = run_arm(name, Path(source), Path(pre), args.batch_size, args.shuffle_buffer)
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir))
    try:
        source, pre = work / "train.parquet", work / "preprocessor.json"
        start = time.perf_counter()
        make_source(source, args.rows)
        save_preprocessor(source, pre)
        size = source.stat().st_size / MIB
        print(f"wrote {args.rows:,} rows ({size:,.0f} MiB) in {time.perf_counter() - start:.1f} s")
        arms = ["memory", "shards"] + ([f"shards-{args.workers}-workers"] if args.workers else [])
        report({name: measure(name, source, pre, args) for name in arms}, args.rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
