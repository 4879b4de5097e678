"""docker-compose.yml cannot be started here (no Docker engine): check that it parses, that it
has the services of the production topology, and that every command is one we really ship."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlops.cli import app
from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_volumes_health_and_restart(compose):
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "minio",
        "minio-init",
        "mlflow",
        "prefect-server",
        "worker",
        "api",
        "dask-scheduler",
        "dask-worker",
    }
    for name, svc in services.items():
        assert "restart" in svc, name
        if name not in {"minio-init", "worker", "dask-worker"}:
            assert "healthcheck" in svc, name
    assert {"pgdata", "miniodata", "workdata"} <= set(compose["volumes"])
    assert services["minio-init"]["restart"] == "no"


def test_no_secret_is_committed(compose):
    text = (REPO / "docker-compose.yml").read_text()
    for key in ("PASSWORD", "SECRET", "TOKEN"):
        for match in re.finditer(rf"{key}[A-Z_]*:\s*(\S+)", text):
            assert match.group(1).startswith(("${", "$${")), match.group(0)
    example = (REPO / "deploy" / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in example and "MLOPS_ADMIN_TOKEN=" in example
    ignored = subprocess.run(["git", "check-ignore", ".env"], cwd=REPO, capture_output=True)
    assert ignored.returncode == 0, ".env must be git-ignored"


def _sql_statements(text: str) -> list[str]:
    """The statements of an SQL script, comments removed, whitespace normalised."""
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    return [" ".join(s.split()) for s in code.split(";") if s.strip()]


def test_the_databases_are_created(compose):
    statements = _sql_statements((REPO / "deploy" / "postgres-init.sql").read_text())
    for db in ("mlflow", "prefect", "predictions"):
        assert f"CREATE DATABASE {db}" in statements
    text = yaml.safe_dump(compose)
    assert "5432/mlflow" in text and "5432/prefect" in text and "5432/predictions" in text


def _options(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


@pytest.mark.parametrize("service", ["worker", "api"])
def test_mlops_commands_exist(compose, service):
    command = compose["services"][service]["command"]
    assert command[0] == "mlops"
    help_text = CliRunner().invoke(app, [command[1], "--help"], env={"COLUMNS": "200"})
    assert help_text.exit_code == 0, help_text.output
    for option in _options(command):
        assert option in help_text.output, (service, option)


@pytest.mark.parametrize(
    ("service", "tool"),
    [
        ("mlflow", "mlflow"),
        ("prefect-server", "prefect"),
        ("dask-scheduler", "dask"),
        ("dask-worker", "dask"),
    ],
)
def test_tool_commands_exist(compose, service, tool):
    command = compose["services"][service]["command"]
    assert command[0] == tool
    words = [c for c in command[1:] if not c.startswith("-")][:2]
    sub = [w for w in words if w in {"server", "start", "scheduler", "worker"}]
    done = subprocess.run(
        [str(BIN / tool), *sub, "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": str(BIN)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in _options(command):
        assert option in done.stdout, (service, option)


def _instructions(dockerfile: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    found = []
    for line in joined.splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            found.append((words[0].upper(), words[1:]))
    return found


def _packages() -> set[str]:
    """The top-level packages pyproject.toml installs (subpackages travel with them)."""
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name.split(".")[0] for name in packages["packages"]}


def test_dockerfile_installs_the_project():
    instructions = _instructions((REPO / "deploy" / "Dockerfile").read_text())
    copied = {src for op, args in instructions if op == "COPY" for src in args[:-1]}
    assert {"pyproject.toml", "constraints.txt", "params.yaml", "dvc.yaml"} <= copied
    assert _packages() <= copied, f"packages not copied: {_packages() - copied}"
    runs = [" ".join(args) for op, args in instructions if op == "RUN"]
    assert any(re.search(r"pip install .*-c constraints\.txt -e \.", r) for r in runs), runs


def test_the_dockerfile_check_sees_comments_as_comments():
    """A package named only in a comment is not copied: the parser must not count it."""
    text = "FROM python:3.11-slim\n# COPY mlops mlops\nCOPY pipeline \\\n  flows ./\n"
    copied = {src for op, args in _instructions(text) if op == "COPY" for src in args[:-1]}
    assert copied == {"pipeline", "flows"}
