"""The production topology, natively: every service a separate process, state in PostgreSQL.

`mlflow server` (PostgreSQL backend, artifacts proxied to a local directory: object storage
is not needed for this check), `prefect server start` (PostgreSQL), a Prefect worker on a
process work pool (`mlops worker`), and `mlops serve` with its prediction log in
PostgreSQL. The loop deployment is triggered through Prefect's REST API, like a user
clicking "Run" in the UI.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipeline import process
from pipeline.config import load_params
from pipeline.ingest import load_digits_frame
from pipeline.process import Supervised, free_port
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.topology]
BIN = Path(sys.executable).parent


def _database(admin: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.rsplit("/", 1)[0] + f"/{name}"


class Processes:
    """The topology's servers, each supervised by pipeline/process.py; stopped in reverse."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.running = logs, {}

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path, url: str = "") -> Supervised:
        server = process.start(cmd, url, self.logs / f"{name}.log", env=env, cwd=cwd)
        self.running[name] = server
        return server

    def tail(self, name: str) -> str:
        return self.running[name].logs(2500)

    def stop_all(self) -> None:
        for server in reversed(list(self.running.values())):
            server.stop()


@pytest.fixture
def topology(tmp_path, pg_url):
    import uuid

    import psycopg

    admin = pg_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    tag = uuid.uuid4().hex[:8]
    dbs = {k: _database(admin, f"mlops_{k}_{tag}") for k in ("mlflow", "prefect")}
    dbs["predictions"] = pg_url
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"]["trials"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    procs = Processes(tmp_path)
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_", "PREFECT_"))
    }
    base.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    ports = {k: free_port() for k in ("mlflow", "prefect", "api")}
    urls = {
        "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
        "prefect": f"http://127.0.0.1:{ports['prefect']}/api",
        "api": f"http://127.0.0.1:{ports['api']}",
    }
    pg = dbs["mlflow"].replace("postgresql://", "postgresql+psycopg://")
    try:
        mlflow_proc = procs.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--backend-store-uri",
                pg,
                "--artifacts-destination",
                (tmp_path / "artifacts").as_uri(),
                "--serve-artifacts",
                "--workers",
                "1",
            ],
            base,
            tmp_path,
            urls["mlflow"],
        )
        prefect_proc = procs.start(
            "prefect",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["prefect"]),
            ],
            {
                **base,
                "PREFECT_API_DATABASE_CONNECTION_URL": dbs["prefect"].replace(
                    "postgresql://", "postgresql+asyncpg://"
                ),
            },
            tmp_path,
            urls["prefect"],
        )
        mlflow_proc.wait_healthy("/health", timeout=180)
        prefect_proc.wait_healthy("/health", timeout=180)
        app_env = {
            **base,
            "MLOPS_ROOT": str(root),
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "PREFECT_API_URL": urls["prefect"],
            "MLOPS_PREDICTION_DB_URL": pg_url,
            "MLOPS_ADMIN_TOKEN": "topology-token",
            "MLOPS_API_URL": urls["api"],
            "MLOPS_RELOAD_INTERVAL_S": "2",
        }
        procs.start(
            "api",
            [str(BIN / "mlops"), "serve", "--port", str(ports["api"])],
            app_env,
            root,
            urls["api"],
        ).wait_healthy("/health", timeout=180)
        procs.start(
            "worker", [str(BIN / "mlops"), "worker", "--pool", f"pool-{tag}"], app_env, root
        )
        yield {"urls": urls, "procs": procs, "root": root, "pool": f"pool-{tag}", "dbs": dbs}
    finally:
        procs.stop_all()
        with psycopg.connect(admin, autocommit=True) as conn:
            for key in ("mlflow", "prefect"):
                conn.execute(f'DROP DATABASE IF EXISTS "{dbs[key].rsplit("/", 1)[1]}" WITH (FORCE)')


def _deployment_id(prefect: httpx.Client, procs: Processes) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        res = prefect.get("/deployments/name/mlops-loop/loop")
        if res.status_code == 200:
            return res.json()["id"]
        time.sleep(1)
    raise TimeoutError(f"loop deployment never registered:\n{procs.tail('worker')}")


def test_loop_runs_on_the_native_production_topology(topology):
    import mlflow

    from pipeline.store import PredictionStore

    urls, procs = topology["urls"], topology["procs"]
    with httpx.Client(base_url=urls["prefect"], timeout=30) as prefect:
        deployment = _deployment_id(prefect, procs)
        run = prefect.post(
            f"/deployments/{deployment}/create_flow_run",
            json={"parameters": {"rounds": 2, "trials": 0, "epochs": 4}},
        ).json()
        deadline = time.monotonic() + 600
        state = None
        while time.monotonic() < deadline:
            flow_run = prefect.get(f"/flow_runs/{run['id']}").json()
            state = flow_run["state"]["type"]
            if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                break
            time.sleep(2)
    assert state == "COMPLETED", f"{state}\n{procs.tail('worker')}"
    assert flow_run["work_pool_name"] == topology["pool"]  # the worker ran it

    # the model is registered in the MLflow server and promoted
    mlflow.set_tracking_uri(urls["mlflow"])
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='digits-classifier'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("digits-classifier", "champion")
    # round 2 trained on the feedback of round 1
    rows = {v.version: int(client.get_run(v.run_id).data.params["rows_train"]) for v in versions}
    assert rows["2"] > rows["1"]

    # the separately started API serves the champion (it follows the alias)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        served = httpx.get(urls["api"] + "/model").json()["model_version"]
        if served == champion.version:
            break
        time.sleep(0.5)
    assert served == champion.version

    # predictions and feedback landed in PostgreSQL
    store = PredictionStore(topology["dbs"]["predictions"])
    try:
        p = load_params(REPO / "params.yaml")
        held_out = len(load_digits_frame("stream", p.data.bootstrap_fraction, p.seed))
        per_round = math.ceil(held_out * p.data.stream_per_round)
        assert store.count() == store.count(labelled=True) == 2 * per_round
    finally:
        store.dispose()
