"""Orchestration overhead: one default demo round through Prefect against the same pipeline
steps called directly (each task's `.fn`), measured in one run, in fresh projects.

    python bench/loop.py [--repeats 2]

Prints both wall times and the overhead ratio, best and median of the repeats (target: at
most 15%). The first direct run also pays for imports; use --repeats 3 or more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["MLOPS_RELOAD_INTERVAL_S"] = "0"


def _fresh_project(base: Path, name: str) -> Path:
    from pipeline.config import get_settings

    root = base / name
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    os.environ["MLOPS_ROOT"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    get_settings.cache_clear()
    return root


def direct_round() -> None:
    """The loop's round 1 with the very same steps, no orchestration."""
    from flows import tasks as t
    from pipeline.config import get_settings, load_params

    settings = get_settings()
    params = load_params(settings.params_path)
    t.ingest_source.fn(settings, params, params.data.source)
    chunk = t.plan_stream.fn(settings, params, 1)[0]
    server = t.start_api.fn(settings)
    try:
        digest = t.version_data.fn(settings)
        t.preprocess_data.fn(settings, params, digest)
        model = t.train_model.fn(settings, params, 1, params.tune.trials, None, False)
        t.promote.fn(settings, params, model["version"])
        t.deploy.fn(server)
        started = time.time()
        traffic = t.send_traffic.fn(settings, server, chunk, 1)
        t.send_labels.fn(settings, server, chunk, traffic["ids"], 1)
        t.check_drift.fn(settings, params, started)
        t.pull_feedback.fn(settings)
        t.version_data.fn(settings)
    finally:
        t.stop_api.fn(server)


def prefect_round() -> None:
    from flows.loop import loop_flow

    loop_flow(rounds=1, source="digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from prefect import flow

    @flow
    def warm() -> int:  # start Prefect's temporary API outside the measurement
        return 1

    warm()
    times: dict[str, list[float]] = {"direct": [], "prefect": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for name, fn in (("direct", direct_round), ("prefect", prefect_round)):
                _fresh_project(Path(tmp), f"{name}-{k}")
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                print(f"{name:8} run {k + 1}: {times[name][-1]:.1f} s", file=sys.stderr)
    import statistics

    for label, pick in (("best", min), ("median", statistics.median)):
        direct, orchestrated = pick(times["direct"]), pick(times["prefect"])
        print(
            f"{label:6}: direct {direct:5.1f} s, through Prefect {orchestrated:5.1f} s, "
            f"orchestration overhead {orchestrated / direct - 1:6.1%} (target <= 15%)"
        )


if __name__ == "__main__":
    main()
