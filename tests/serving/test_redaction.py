"""No password of a configured URL reaches a client, a log line or the console."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from pipeline.config import get_settings
from pipeline.redact import redact
from serving.app import create_app

SECRET = "s3cr3t-pw"


def test_redact_masks_passwords_and_keeps_the_rest():
    assert redact(f"http://user:{SECRET}@mlflow:5000/api") == "http://user:***@mlflow:5000/api"
    assert (
        redact(f"MLflow at postgresql+psycopg://app:{SECRET}@db/x is down: boom")
        == "MLflow at postgresql+psycopg://app:***@db/x is down: boom"
    )
    assert SECRET not in redact(f"s3://b/k?X-Amz-Signature={SECRET}&x=1")
    assert SECRET not in redact(f"https://h/p?token={SECRET}")
    assert redact("http://mlflow:5000 and user@example.com") == (
        "http://mlflow:5000 and user@example.com"  # nothing to hide: unchanged
    )


def test_no_password_in_responses_or_logs_when_the_registry_is_down(
    served, monkeypatch, digits_rows, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@127.0.0.1:9")
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", f"postgresql://mlops:{SECRET}@127.0.0.1:1/x")
    get_settings.cache_clear()
    with caplog.at_level(logging.INFO), TestClient(create_app(get_settings())) as client:
        bodies = [
            client.get("/ready"),
            client.get("/model"),
            client.post("/predict", json={"instances": digits_rows[:1].tolist()}),
        ]
    texts = [r.text for r in bodies]
    assert all(SECRET not in t for t in texts), texts
    assert "user:***@" in texts[1], texts[1]  # the load error says where, without the password
    assert bodies[2].status_code == 503
    # the server installs its redacting filter on every handler (pytest's capture included)
    messages = [r.getMessage() for r in caplog.records]
    assert any("127.0.0.1:9" in m for m in messages), messages  # the failure was logged ...
    assert not [m for m in messages if SECRET in m]  # ... without the password


def test_no_password_in_the_cli(project, monkeypatch):
    from mlops.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@127.0.0.1:9")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1
    assert SECRET not in result.output and "user:***@127.0.0.1:9" in result.output
