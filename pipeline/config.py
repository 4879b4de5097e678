"""Settings and parameters: one place, no work at import time.

`Settings` holds deployment configuration (paths, URLs, tokens) and is read from
`MLOPS_*` environment variables or a `.env` file. `params.yaml` holds the ML
parameters that DVC tracks (split sizes, epochs, search space); both DVC stages and
the code read the same file through `load_params`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PARAMS: dict[str, Any] = {
    "seed": 42,
    "data": {"source": "digits", "name": "dataset", "bootstrap_fraction": 0.35, "num_classes": 10},
    "split": {"val_size": 0.15, "test_size": 0.2},
    "preprocess": {"augment": True, "max_shift": 1, "noise_std": 0.05},
}


class Settings(BaseSettings):
    """Deployment configuration. Every path hangs off `root`."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_", env_file=".env", extra="ignore")

    root: Path = Field(default_factory=Path.cwd, description="project root; all paths hang off it")
    params_file: Path | None = Field(
        default=None, description="params.yaml (default: root/params.yaml)"
    )
    model_name: str = "digits-classifier"
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    prediction_db_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the prediction log (default: SQLite under root)",
    )
    admin_token: SecretStr | None = None
    api_key: SecretStr | None = None
    max_ingest_bytes: int = Field(default=2 * 1024**3, description="larger files are refused")
    host: str = "127.0.0.1"
    port: int = 8000
    # --- serving ---
    model_ref: str = Field(default="champion", description="alias or version number to serve")
    reload_interval_s: float = Field(default=10.0, description="poll the alias (0: never)")
    max_rows_per_request: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    batch_max_rows: int = 512
    batch_max_wait_ms: float = 2.0
    log_mode: Literal["durable", "async", "off"] = Field(
        default="durable",
        description="durable: answer after the log commit; async: before it; "
        "off: no prediction log (benchmarks only: breaks the feedback loop)",
    )
    log_queue_max: int = 50_000
    api_url: str | None = Field(
        default=None,
        description="a running prediction server the loop deploys to "
        "(with MLOPS_ADMIN_TOKEN); unset: the loop starts its own",
    )
    train_processes: int = Field(
        default=1, description="> 1: train with torchrun DDP over this many processes"
    )
    torch_threads: int = Field(default=0, description="0: one per core, minus the event loop's")
    otel: bool = Field(
        default=False,
        description="FastAPI's OpenTelemetry spans and metrics, for an OTel SDK you configure; "
        "off, the server skips that per-request check (/metrics is always on)",
    )

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def processed_dir(self) -> Path:
        return self.data_dir / "processed"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def loop_dir(self) -> Path:
        """The loop's DVC-versioned data: bootstrap pool + pulled feedback."""
        return self.data_dir / "loop"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def params_path(self) -> Path:
        return self.params_file or self.root / "params.yaml"

    @property
    def tracking_uri(self) -> str:
        """MLflow's own variable wins; the embedded default is SQLite under root."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return (self.root / "mlartifacts").resolve().as_uri()

    @property
    def prediction_db(self) -> str:
        return self.prediction_db_url or f"sqlite:///{self.root / 'predictions.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_params(path: Path | None = None) -> dict[str, Any]:
    """Read params.yaml over the embedded defaults (a missing file means defaults)."""
    path = path or get_settings().params_path
    if not path.exists():
        return _merge(DEFAULT_PARAMS, {})
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return _merge(DEFAULT_PARAMS, loaded)
