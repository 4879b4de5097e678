"""A trained, registered champion built once per session; each test gets its own copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline import process
from pipeline.process import Supervised, free_port
from tests.conftest import REPO
from tests.serving.helpers import digits_stream


@pytest.fixture(scope="session")
def base_project(tmp_path_factory) -> Path:
    """ingest -> preprocess -> train (3 epochs) -> register v1 -> promote, in a temp root."""
    root = tmp_path_factory.mktemp("served") / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = {**os.environ, "MLOPS_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlops = str(Path(sys.executable).parent / "mlops")
    for args in (["ingest"], ["preprocess"], ["train", "--epochs", "3", "--no-progress"]):
        done = subprocess.run(
            [mlops, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def served(base_project, tmp_path, monkeypatch):
    """A private copy of the base project (its own MLflow DB and prediction log)."""
    from pipeline.config import get_settings

    root = tmp_path / "project"
    shutil.copytree(base_project, root, ignore=shutil.ignore_patterns("predictions.db*"))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLOPS_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLOPS_RELOAD_INTERVAL_S", "0")
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@contextmanager
def in_process_app(root: Path, db_name: str, **env: str):
    """The app with its lifespan, in this process, on `root`'s champion and its own log
    database; for module-scoped clients (the environment is restored afterwards)."""
    from fastapi.testclient import TestClient

    from pipeline.config import get_settings
    from serving.app import create_app

    old = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(
        MLOPS_ROOT=str(root),
        MLOPS_RELOAD_INTERVAL_S="0",
        MLOPS_PREDICTION_DB_URL=f"sqlite:///{root / db_name}",
        **env,
    )
    get_settings.cache_clear()
    try:
        with TestClient(create_app(get_settings())) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(old)
        get_settings.cache_clear()


@pytest.fixture
def digits_rows() -> np.ndarray:
    return digits_stream().drop(columns="label").to_numpy(np.float32)


class LiveServer:
    """`mlops serve` as a real process on a loopback port (supervised by pipeline.process)."""

    def __init__(
        self, root: Path, workers: int = 1, env: dict | None = None, args: tuple = ()
    ) -> None:
        self.root, self.port, self.args = root, free_port(), list(args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MLOPS_ROOT": str(root), **(env or {})}
        self.workers = workers
        self.process: Supervised | None = None

    def start(self, timeout: float = 60) -> LiveServer:
        mlops = str(Path(sys.executable).parent / "mlops")
        cmd = [mlops, "serve", "--port", str(self.port), "--workers", str(self.workers)]
        self.process = process.start(
            [*cmd, *self.args],
            self.url,
            self.root / f"server-{self.port}.log",
            env=self.env,
            cwd=self.root,
        ).wait_healthy("/ready", timeout)
        return self

    @property
    def returncode(self) -> int | None:
        return self.process.proc.poll() if self.process else None

    def logs(self) -> str:
        return self.process.logs() if self.process else ""

    def kill9(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@pytest.fixture
def live_server(served):
    servers: list[LiveServer] = []

    def start(**kw) -> LiveServer:
        server = LiveServer(served, **kw).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
