"""Shared fixtures: every test gets its own project root, so nothing touches the checkout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.config import sqlalchemy_url

REPO = Path(__file__).resolve().parents[1]

# Nothing may try to reach the internet (no network here, and CI must not hang on it).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The `mlops` subprocesses start Prefect's temporary server; on a loaded CI machine it can
# take longer than Prefect's default 20 s to answer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Prefect keeps its database and artifacts under PREFECT_HOME (~/.prefect by default): the
# suite's flow runs, and those of the `mlops run` subprocesses it starts, go to a home of
# their own, never into the user's.
TEST_PREFECT_HOME = tempfile.mkdtemp(prefix="mlops-test-prefect-")
os.environ["PREFECT_HOME"] = TEST_PREFECT_HOME
atexit.register(shutil.rmtree, TEST_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks(monkeypatch):
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ, which every
    later subprocess would inherit: each test starts and ends without it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project root with the repo's params.yaml; settings point at it."""
    from pipeline.config import get_settings

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLOPS_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@pytest.fixture
def settings(project: Path):
    from pipeline.config import get_settings

    return get_settings()


@pytest.fixture
def params(project: Path) -> dict:
    from pipeline.config import load_params

    return load_params(project / "params.yaml")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the local server (dropped afterwards), as the
    SQLAlchemy URL that Settings makes of MLOPS_PREDICTION_DB_URL (psycopg 3 driver)."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    admin = os.environ.get("MLOPS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"mlops_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {admin}: {exc}")
    yield sqlalchemy_url(admin.rsplit("/", 1)[0] + f"/{name}")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_on_both(request, tmp_path):
    """A fresh prediction store on SQLite, then on a fresh PostgreSQL database."""
    from pipeline.store import PredictionStore

    url = (
        f"sqlite:///{tmp_path / 'log.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    s = PredictionStore(url).create()
    yield s
    s.dispose()
