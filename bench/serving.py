"""Serving benchmark: the same registered champion behind four paths, measured in one run.

  (a) in-process torch inference (the limit, torch threads pinned as the server pins them),
  (b) `mlflow models serve --env-manager local -w 1`, (c) `mlops serve` with 1 worker and
  durable logging, and with 2 (one per core of the machine the bar was set on), (d) one
  worker with logging off (and two, `off-w2`, when named), (e) the peers (LitServe,
  MLServer, BentoML, bench/peers.py); and `mlops predict`'s batch path on 64-row chunks,
  against (a).

Load comes from a keep-alive client (wrk when installed, else a Python asyncio client) at
concurrency 1, 8 and 32, with 1-row and 64-row requests, after a warm-up. Prints req/s,
rows/s, p50/p99 and the ratios against MLflow's server and against logging off. All servers
run at once and take turns cell by cell (ABBA order with --repeats), each figure the median
of its turns, so a slow minute on a shared machine does not land on one path only.

    python bench/serving.py [--duration 5] [--warmup 1] [--repeats 1]
                            [--concurrency 1,8,32] [--paths mlflow,durable,off]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import peers  # noqa: E402 - bench/peers.py, beside this file

if TYPE_CHECKING:
    from pipeline.process import Supervised
BIN = Path(sys.executable).parent
NAME = "digits-classifier"


def _prepare(root: Path) -> dict:
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = {
        **os.environ,
        "MLOPS_ROOT": str(root),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }  # mlflow execs `uvicorn`
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (["ingest"], ["preprocess"], ["train", "--epochs", "5", "--no-progress"]):
        subprocess.run(
            [str(BIN / "mlops"), *args], cwd=root, env=env, check=True, capture_output=True
        )
    return env


def _start(kind: str, root: Path, env: dict) -> tuple[Supervised, str]:
    """One server of the comparison, started and healthy; returns it and its scoring URL."""
    from pipeline import process

    port = process.free_port()
    base = f"http://127.0.0.1:{port}"
    if kind in peers.PEERS:
        peer = peers.PEERS[kind]
        python = peers.venv(peer)
        model_dir = _model_dir(root, env)
        workdir = root / f"peer-{kind}"
        workdir.mkdir(exist_ok=True)
        workers = int(env.get("MLOPS_BENCH_WORKERS", "1"))
        cmd = peers.command(peer, python, model_dir, port, workdir, workers)
        server = process.start(
            cmd, base, root / f"{kind}.log", env=peers.env(peer, env, model_dir), cwd=workdir
        )
        return server.wait_healthy(peers.health_path(peer), timeout=300), base + (
            peers.predict_path(peer)
        )
    if kind == "mlflow":
        cmd = [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-w",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        health, path = "/ping", "/invocations"
    else:
        workers = "2" if kind.endswith("-w2") else "1"
        cmd = [str(BIN / "mlops"), "serve", "--port", str(port), "--workers", workers]
        env = {
            **env,
            "MLOPS_LOG_MODE": "off" if kind.startswith("off") else "durable",
            "MLOPS_PREDICTION_DB_URL": f"sqlite:///{root / (kind + '.db')}",
        }
        if kind == "shadow":  # the champion in shadow of itself: every request scored twice
            env["MLOPS_SHADOW_MODEL"] = "champion"
        health, path = "/ready", "/predict"
    server = process.start(cmd, base, root / f"{kind}.log", env=env, cwd=root)
    return server.wait_healthy(health, timeout=120), base + path


_MODEL_DIR: list[Path] = []


def _model_dir(root: Path, env: dict) -> Path:
    """The champion's model directory (checkpoint + preprocessor), fetched once: what
    every peer serves."""
    if not _MODEL_DIR:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        from pipeline.registry import download_model

        _MODEL_DIR.append(download_model(NAME, "champion", root / "exported")[0])
    return _MODEL_DIR[0]


def _body(kind: str, rows: np.ndarray) -> bytes:
    if kind == "v2" or (kind in peers.PEERS and peers.PEERS[kind].v2):
        tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
        return json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]}).encode()
    if kind == "mlflow":
        names = [f"pixel{i}" for i in range(rows.shape[1])]
        return json.dumps({"dataframe_split": {"columns": names, "data": rows.tolist()}}).encode()
    return json.dumps({"instances": rows.tolist()}).encode()


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("%s", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%f %%f %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status + e.connect + e.read + e.write + e.timeout))
end
"""


def _load_wrk(url: str, body: bytes, conc: int, seconds: float, tmp: Path) -> dict:
    body_file = tmp / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT % body_file)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conc}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    n, duration_us, p50, p99, errors = line.split()[1:]
    return {
        "requests": int(n),
        "seconds": int(duration_us) / 1e6,
        "p50_ms": float(p50) / 1000,
        "p99_ms": float(p99) / 1000,
        "errors": int(errors),
    }


def _load_python(url: str, body: bytes, conc: int, seconds: float, _tmp: Path) -> dict:
    import aiohttp

    async def run() -> dict:
        latencies, errors = [], 0
        deadline = time.perf_counter() + seconds
        async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as http:

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    async with http.post(url, data=body) as res:
                        await res.read()
                        errors += res.status != 200
                    latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            elapsed = time.perf_counter() - start
        lat = np.array(latencies) * 1000
        return {
            "requests": len(lat),
            "seconds": elapsed,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "errors": errors,
        }

    return asyncio.run(run())


def _in_process(root: Path, rows: np.ndarray, seconds: float) -> list[dict]:
    os.environ["MLOPS_ROOT"] = str(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    import torch

    from pipeline.registry import load_predictor

    predictor, _ = load_predictor(NAME, "champion")
    # the server's own thread count (serving/app.py): one per core but the event loop's,
    # so this limit and the servers run the same kernels; unpinned, torch oversubscribed
    # the cores a server under load also used, and this arm once read 41 calls/s
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    out = []
    for n in (1, 64):
        x = rows[:n]
        for _ in range(50):
            predictor.predict_proba(x)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predictor.predict_proba(x)
            calls += 1
        elapsed = time.perf_counter() - start
        out.append(
            {
                "path": "in-process torch",
                "conc": 1,
                "rows": n,
                "req_s": calls / elapsed,
                "rows_s": calls * n / elapsed,
                "p50_ms": elapsed / calls * 1000,
                "p99_ms": float("nan"),
                "errors": 0,
            }
        )
    return out


def _batch(root: Path, rows: np.ndarray, tmp: Path, limit_rows_s: float) -> dict:
    """`mlops predict`'s path (pipeline.batch) on 64-row chunks of a Parquet file, in this
    process: rows/s against the in-process limit at 64 rows (target >= 50%)."""
    import pandas as pd

    from pipeline.batch import predict_file
    from pipeline.registry import load_predictor

    predictor, mv = load_predictor(NAME, "champion")
    n = 64 * 800
    frame = pd.DataFrame(np.resize(rows, (n, rows.shape[1])), columns=list(predictor.feature_names))
    source = tmp / "batch.parquet"
    frame.to_parquet(source, row_group_size=8192)
    predict_file(source, tmp / "warm.csv", predictor, NAME, str(mv.version), chunk_rows=64)
    result = predict_file(source, tmp / "out.csv", predictor, NAME, str(mv.version), chunk_rows=64)
    return {
        "path": "mlops predict (64-row chunks)",
        "conc": 1,
        "rows": 64,
        "req_s": result.rows_per_s / 64,
        "rows_s": result.rows_per_s,
        "p50_ms": 64 / result.rows_per_s * 1000,
        "p99_ms": float("nan"),
        "errors": 0,
        "vs_limit": result.rows_per_s / limit_rows_s,
    }


LABELS = {
    "mlflow": "mlflow models serve",
    "durable": "mlops serve (log on)",
    "off": "mlops serve (log off)",
    "v2": "mlops serve V2 (log on)",
    "durable-w2": "mlops serve -w 2 (log on)",
    "off-w2": "mlops serve -w 2 (log off)",
    "shadow": "mlops serve + shadow (log on)",
} | {name: peer.label for name, peer in peers.PEERS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--paths",
        default="mlflow,durable,durable-w2,off,v2,litserve,mlserver,bentoml",
        help="servers to measure (a subset, to iterate); v2 is mlops serve's /v2 route, "
        "durable-w2 mlops serve --workers 2 (one per core here), off-w2 the same with the log "
        "off (not measured unless named), shadow mlops serve with a "
        "shadow on every request (not measured unless named); the peers run in virtualenvs "
        "made on first use (bench/peers.py)",
    )
    parser.add_argument(
        "--peer-workers",
        type=int,
        default=1,
        help="inference workers of each peer (compare with durable-w2 at 2)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each cell this many times, the paths taking turns; report the medians",
    )
    args = parser.parse_args()
    paths = [p for p in LABELS if p in args.paths.split(",")]
    loader = _load_wrk if shutil.which("wrk") else _load_python
    concurrency = [int(c) for c in args.concurrency.split(",")]
    from pipeline.ingest import load_digits_frame

    rows = load_digits_frame("all").drop(columns="label").to_numpy(np.float32)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "project"
        root.mkdir()
        env = _prepare(root)
        env["MLOPS_BENCH_WORKERS"] = str(args.peer_workers)
        if args.peer_workers > 1:
            for name, peer in peers.PEERS.items():
                LABELS[name] = f"{peer.label}, {args.peer_workers} workers"
        results += _in_process(root, rows, args.duration)
        limit_64 = next(r["rows_s"] for r in results if r["rows"] == 64)
        results.append(_batch(root, rows, tmp, limit_64))
        # All servers run at once, idle but for the one under load, and take turns cell by
        # cell: a slow minute on a shared machine then hits every path, not just one.
        servers: dict[str, tuple[Supervised, str]] = {}
        try:
            for kind in paths:
                if kind == "v2":  # the log-on server's Open Inference Protocol route
                    continue
                servers[kind] = _start(kind, root, env)
                print(f"  {LABELS[kind]} up", file=sys.stderr)
            if "v2" in paths:
                server, url = servers.get("durable") or _start("durable", root, env)
                servers.setdefault("durable", (server, url))
                servers["v2"] = (server, url.replace("/predict", f"/v2/models/{NAME}/infer"))
            for n in (1, 64):
                for conc in concurrency:
                    runs: dict[str, list[dict]] = {kind: [] for kind in paths}
                    for turn in range(args.repeats):
                        # ABBA order: neither path always runs first after a switch
                        for kind in paths if turn % 2 == 0 else paths[::-1]:
                            url, body = servers[kind][1], _body(kind, rows[:n])
                            loader(url, body, conc, args.warmup, tmp)  # warm-up
                            runs[kind].append(loader(url, body, conc, args.duration, tmp))
                    for kind in paths:
                        results.append(_cell(LABELS[kind], conc, n, runs[kind]))
                        print(
                            f"  {LABELS[kind]:24} c={conc:<3} rows={n:<3} "
                            f"{results[-1]['req_s']:9.0f} req/s",
                            file=sys.stderr,
                        )
        finally:
            for server in {id(s): s for s, _ in servers.values()}.values():
                server.stop()
    _report(results, loader.__name__, args.repeats)


def _cell(label: str, conc: int, n: int, runs: list[dict]) -> dict:
    """The medians over repeated measurements of one path at one load."""
    req_s = float(np.median([r["requests"] / r["seconds"] for r in runs]))
    return {
        "path": label,
        "conc": conc,
        "rows": n,
        "req_s": req_s,
        "rows_s": req_s * n,
        "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
        "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
        "errors": sum(r["errors"] for r in runs),
    }


def _report(results: list[dict], loader: str, repeats: int) -> None:
    print(f"\nload generator: {'wrk' if loader == '_load_wrk' else 'python asyncio (aiohttp)'}")
    if repeats > 1:
        print(f"each server cell: the median of {repeats} turns")
    print(
        f"{'path':26} {'conc':>4} {'rows':>4} {'req/s':>9} {'rows/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>6}"
    )
    for r in results:
        print(
            f"{r['path']:26} {r['conc']:>4} {r['rows']:>4} {r['req_s']:9.0f} {r['rows_s']:10.0f}"
            f" {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:>6}"
        )

    def pick(path: str, conc: int, rows: int) -> dict:
        return next(
            r for r in results if r["path"] == path and r["conc"] == conc and r["rows"] == rows
        )

    def ratio(name: str, path: str, rows: int, key: str, base: str, invert: bool = False):
        try:
            ours, theirs = pick(path, 8, rows), pick(base, 8, rows)
        except StopIteration:  # that path was not measured in this run
            return
        value = ours[key] / theirs[key]
        ratios[name] = 1 - value if invert else value

    ratios: dict[str, float] = {}
    peer_labels = [LABELS[name] for name in peers.PEERS]
    measured_peers = [r for r in results if r["path"] in peer_labels]
    if measured_peers:
        print("\nagainst the best peer in each cell (mlops serve, log on):")
        print(
            f"{'cell':12} {'ours':7} {'best peer':38} {'req/s ratio':>11} {'p99 ours/theirs':>16}"
        )
        ours = {LABELS["durable"]: "-w 1", LABELS["durable-w2"]: "-w 2"}
        for r in results:
            if r["path"] not in ours:
                continue
            cell = [p for p in measured_peers if p["conc"] == r["conc"] and p["rows"] == r["rows"]]
            best = max(cell, key=lambda p: p["req_s"])
            print(
                f"{r['rows']:>3} x c={r['conc']:<5} {ours[r['path']]:7} {best['path'][:38]:38} "
                f"{r['req_s'] / best['req_s']:11.2f} "
                f"{r['p99_ms']:7.1f} / {best['p99_ms']:<7.1f}"
            )
    limit = next((r for r in results if r["path"] == "in-process torch" and r["rows"] == 64), None)
    for path in (LABELS["durable"], LABELS["durable-w2"]):
        cell = [r for r in results if r["path"] == path and r["conc"] == 8 and r["rows"] == 64]
        if limit and cell:
            ratios[f"{path}: 64-row rows/s at c=8 vs the in-process limit (target >= 0.7)"] = (
                cell[0]["rows_s"] / limit["rows_s"]
            )
    batch = next((r for r in results if "vs_limit" in r), None)
    if batch:
        ratios["mlops predict rows/s vs the in-process limit, 64 rows (target >= 0.5)"] = batch[
            "vs_limit"
        ]
    on, off, ml = "mlops serve (log on)", "mlops serve (log off)", "mlflow models serve"
    ratio("1-row req/s at c=8 vs MLflow (target >= 5x)", on, 1, "req_s", ml)
    ratio("64-row rows/s at c=8 vs MLflow (target >= 4x)", on, 64, "rows_s", ml)
    ratio("1-row p99 at c=8 vs MLflow (target <= 0.33)", on, 1, "p99_ms", ml)
    ratio("durable logging cost, 1-row c=8 (target <= 10%)", on, 1, "req_s", off, invert=True)
    ratio("durable logging cost, 64-row c=8 (target <= 10%)", on, 64, "rows_s", off, invert=True)
    on2, off2 = LABELS["durable-w2"], LABELS["off-w2"]
    ratio("durable logging cost with -w 2, 1-row c=8", on2, 1, "req_s", off2, invert=True)
    ratio("durable logging cost with -w 2, 64-row c=8", on2, 64, "rows_s", off2, invert=True)
    shadow = LABELS["shadow"]
    ratio("shadow cost, 1-row c=8 (target <= 10%)", shadow, 1, "req_s", on, invert=True)
    ratio("shadow cost, 64-row c=8", shadow, 64, "rows_s", on, invert=True)
    print()
    for name, value in ratios.items():
        print(f"{name:52} {value:6.2f}")


if __name__ == "__main__":
    main()
