from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def loop_project(project, tmp_path):
    """The test's project root as a git repository with a DVC remote in a temp dir."""
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    from pipeline.lineage import ensure_dvc_repo

    ensure_dvc_repo(project)
    subprocess.run(
        ["dvc", "remote", "add", "-d", "test", str(tmp_path / "remote")],
        cwd=project,
        check=True,
        env=_env(),
    )
    return project


def _env():
    import os
    import sys
    from pathlib import Path

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
