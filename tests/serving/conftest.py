"""A trained, registered champion built once per session; each test gets its own copy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO


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
    from pipeline.ingest import load_digits_frame

    stream = load_digits_frame("stream", 0.35, 42)
    return stream.drop(columns="label").to_numpy(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`mlops serve` as a real process on a loopback port."""

    def __init__(
        self, root: Path, workers: int = 1, env: dict | None = None, args: tuple = ()
    ) -> None:
        self.root, self.port, self.args = root, free_port(), list(args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MLOPS_ROOT": str(root), **(env or {})}
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> LiveServer:
        mlops = str(Path(sys.executable).parent / "mlops")
        self.log = open(self.root / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [mlops, "serve", "--port", str(self.port), "--workers", str(self.workers), *self.args],
            cwd=self.root,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.logs()}")

    def logs(self) -> str:
        return (self.root / f"server-{self.port}.log").read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


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
