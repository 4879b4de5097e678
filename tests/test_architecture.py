"""The layers: the CLI -> flows | serving -> pipeline, every import pointing down.

import-linter reads the contracts from pyproject.toml; `make test` runs them here, so an
upward import, an import cycle or a Prefect/FastAPI import in the library fails CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("mlops", "flows", "serving", "pipeline")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": str(LINT.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_are_kept():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "5 kept" in done.stdout


@pytest.fixture
def copy_of_the_code(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "added", "broken"),
    [
        ("pipeline/model.py", "import flows.tasks", "Layers"),
        ("pipeline/store.py", "from serving import metrics", "Layers"),
        ("flows/tasks.py", "from serving.app import create_app", "Layers"),
        ("pipeline/ingest.py", "import prefect", "no orchestration"),
        ("serving/deps.py", "from pipeline.train import train_model", "never trains"),
        ("pipeline/validate.py", "from pipeline import gate", "No import cycle"),
        ("pipeline/train.py", "import mlflow", "training loop"),
    ],
)
def test_a_wrong_import_breaks_a_contract(copy_of_the_code, module, added, broken):
    """Each contract can fail: one wrong import, even inside a function, is caught."""
    path = copy_of_the_code / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {added}\n")
    done = _lint(copy_of_the_code)
    assert done.returncode != 0, done.stdout
    broken_lines = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(broken in line for line in broken_lines), broken_lines
