"""Shared fixtures: every test gets its own project root, so nothing touches the checkout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing may try to reach the internet (no network here, and CI must not hang on it).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


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
