"""Soak: a longer version of tests/reliability/test_load.py. M clients send N predictions
(1-row and batched, client ids) then the labels, against `mlops serve` on SQLite or
PostgreSQL with 1 or 2 workers; prints throughput and what was lost (must be 0).

`--chaos` runs a chaos thread during the soak that applies, at random, the faults of the
reliability suite: a 1 MB request head (431 expected), 40 slowloris connections, a 5 MB
body from urllib (the 413 must be readable), a stalled body (408), two conflicting labels
for one id at once (exactly one winner), and concurrent `promote`/`rollback` pairs (the
champion alias must equal the ledger's afterwards). It reports each fault's count and
every anomaly, and acknowledged vs stored (target: equal, every run). (Deleting the
SQLite file is left to tests/pipeline/test_store.py: rows committed just before a delete
are gone with the file, so acknowledged = stored cannot hold across it by construction.)

    python bench/soak.py [--n 20000] [--clients 16] [--workers 1] [--pg postgresql://...]
                         [--chaos]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pg", help="PostgreSQL URL of an empty database (default: SQLite)")
    parser.add_argument("--chaos", action="store_true", help="apply faults during the soak")
    args = parser.parse_args()

    from pipeline import process
    from pipeline.config import load_params
    from pipeline.ingest import load_digits_frame
    from pipeline.store import PredictionStore
    from serving.loadgen import run_load

    params = load_params(REPO / "params.yaml")  # the split the trained model was made with
    stream = load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
    rows = stream.drop(columns="label").to_numpy("float32").tolist()
    labels = stream["label"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        env = {**os.environ, "MLOPS_ROOT": str(root)}
        env.pop("MLFLOW_TRACKING_URI", None)
        mlops = str(Path(sys.executable).parent / "mlops")
        steps = [["ingest"], ["preprocess"], ["train", "--epochs", "5", "--no-progress"]]
        if args.chaos:  # a second version for the promotion races
            steps.append(["train", "--epochs", "2", "--no-progress", "--no-promote"])
        for step in steps:
            subprocess.run([mlops, *step], cwd=root, env=env, check=True, capture_output=True)
        db = args.pg or f"sqlite:///{root / 'soak.db'}"
        port = process.free_port()
        server = process.start(
            [mlops, "serve", "--port", str(port), "--workers", str(args.workers)],
            f"http://127.0.0.1:{port}",
            root / "server.log",
            env={
                **env,
                "MLOPS_PREDICTION_DB_URL": db,
                "MLOPS_HEADER_TIMEOUT_S": "2",
                "MLOPS_BODY_TIMEOUT_S": "2",
                "MLOPS_RELOAD_INTERVAL_S": "1",
            },
            cwd=root,
        ).wait_healthy("/ready", timeout=120)
        chaos = None
        if args.chaos:
            from chaos import Chaos  # bench/chaos.py

            os.environ.update(MLOPS_ROOT=str(root), MLOPS_PREDICTION_DB_URL=db)
            chaos = Chaos(server.url, root, rows[0]).start()
        try:
            result = run_load(server.url, rows, labels, args.n, args.clients, prefix="soak")
        finally:
            if chaos is not None:
                chaos.stop()
            server.stop()
        store = PredictionStore(db)
        stored, labelled = store.count(), store.count(labelled=True)
        acknowledged = result.acknowledged + (chaos.acknowledged if chaos else [])
        missing = set(acknowledged) - set(store.get(acknowledged))
        anomalies = chaos.report() if chaos else []
    print(f"store {db.split(':')[0]}, {args.workers} worker(s), {args.clients} clients")
    print(
        f"predictions sent {args.n}, acknowledged {len(result.acknowledged)}, "
        f"errors {len(result.failures)}"
    )
    print(
        f"rows acknowledged {len(acknowledged)}, stored {stored}, labels joined {labelled}, "
        f"acknowledged but lost {len(missing)}"
    )
    print(
        f"{len(result.acknowledged) / result.seconds:.0f} predicted rows/s over "
        f"{result.seconds:.1f} s (labels included)"
    )
    ok = not missing and not result.failures and stored == len(acknowledged) and not anomalies
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
