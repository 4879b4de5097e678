"""Settings and parameters: one place, no work at import time.

`Settings` holds deployment configuration (paths, URLs, tokens) and is read from
`MLOPS_*` environment variables or a `.env` file. `Params` is the typed schema of
`params.yaml`, the ML parameters that DVC tracks (split sizes, epochs, search space): each
default is written once, here, beside its reason. The shipped params.yaml spells the same
values out for DVC and for users to edit (a test keeps the two equal); a key missing from a
user's file takes the default below, and an unknown key is an error, not a silent typo.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# --- params.yaml --------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = "digits"  # built-in, nothing to download; or a CSV/Parquet file or directory
    name: str = "dataset"  # snapshot name: data/raw/<name>.parquet
    # `mlops run`: 35% of the source trains the first model (the digits: 628 of 1,797
    # images); the other 65% are the "production stream" the simulated clients send, so
    # feedback has room to help (pipeline/stream.py).
    bootstrap_fraction: float = Field(default=0.35, gt=0, lt=1)
    # Each round sends this share of the stream: two rounds of `make run` send half of it,
    # and a second run continues with the other half instead of replaying the first.
    stream_per_round: float = Field(default=0.25, gt=0, le=1)
    num_classes: int = Field(default=10, ge=2)  # digits 0-9; labels outside [0, C) are quarantined
    # Sources with more rows than this go through the streaming stages (pipeline/chunks.py):
    # read, validated, split and fitted `chunk_rows` at a time, memory bounded by the chunk.
    streaming_above_rows: int = Field(default=1_000_000, ge=1)
    chunk_rows: int = Field(default=65_536, ge=1)  # rows per chunk (streaming stages, feedback)


class SplitParams(_Section):
    val_size: float = Field(default=0.15, gt=0, lt=1)  # early stopping and tuning read this
    test_size: float = Field(default=0.2, gt=0, lt=1)  # fixed across rounds: like with like

    @model_validator(mode="after")
    def _room_to_train(self) -> SplitParams:
        if self.val_size + self.test_size >= 0.9:
            raise ValueError("split: val_size + test_size must leave at least 10% to train on")
        return self


class PreprocessParams(_Section):
    # How features are scaled, fitted on the training split. "auto": one global mean and
    # standard deviation for images (per-pixel scales blow up the border pixels that are
    # almost always 0, bench/quality.py), per-feature standardisation for tables.
    scaling: Literal["auto", "image", "feature"] = "auto"
    augment: bool = True  # random shifts + noise on image data: +1-2% accuracy on digits
    max_shift: int = Field(default=1, ge=0)  # pixels; 1 of 8 keeps a digit recognisable
    noise_std: float = Field(default=0.05, ge=0)  # in standardised units


class TrainSection(_Section):
    epochs: int = Field(default=20, ge=1)  # the budget; early stopping usually ends sooner
    batch_size: int = Field(default=32, ge=1)  # bench/quality.py: +0.5 points against 64
    lr: float = Field(default=3e-3, gt=0)  # AdamW; tuning searches around it
    weight_decay: float = Field(default=1e-4, ge=0)
    # bench/quality.py: 0.1 keeps the demo's small bootstrap pool (400 training images)
    # stable, 0.965 against 0.937 at 0.25, at the same accuracy on the larger sets
    dropout: float = Field(default=0.1, ge=0, lt=1)
    hidden: int = Field(default=64, ge=1)  # units of the dense layer
    patience: int = Field(default=8, ge=1)  # epochs without a better validation accuracy
    # The learning rate over the epoch budget: "cosine" decays it to ~0 by the last epoch
    # (bench/quality.py: +1-2 points on the image sets against a constant rate), "constant".
    schedule: Literal["cosine", "constant"] = "cosine"
    warm_start: bool = False  # start from the champion's weights when the architecture matches
    # Train from the split's Parquet row groups through an iterable dataset (pipeline/shards.py)
    # instead of one in-memory tensor: "auto" does when the training split has more rows than
    # data.streaming_above_rows.
    from_shards: Literal["auto", "on", "off"] = "auto"
    shuffle_buffer: int = Field(default=65_536, ge=1)  # rows mixed before batches are drawn


class Range(_Section):
    """A search range: integers when both ends are integers (and not log), else floats."""

    low: int | float
    high: int | float
    log: bool = False  # log-uniform: for scales like the learning rate

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class TuneParams(_Section):
    trials: int = Field(default=4, ge=0)  # demo budget on 2 cores; `--trials K` overrides
    epochs: int = Field(default=10, ge=1)  # per trial; the median pruner stops bad ones sooner
    timeout_s: float | None = Field(default=120, gt=0)  # the whole study; None: no limit
    # A list is a categorical choice; {low, high[, log]} a float range.
    space: dict[str, list[float | int] | Range] = Field(
        default_factory=lambda: {
            "lr": Range(low=3e-4, high=1e-2, log=True),
            "batch_size": [32, 64, 128],
            "dropout": Range(low=0.0, high=0.5),
            "weight_decay": Range(low=1e-6, high=1e-3, log=True),
            "hidden": [32, 64, 128],
        }
    )

    @field_validator("space")
    @classmethod
    def _trainable(cls, space: dict) -> dict:
        known = set(TrainSection.model_fields) | set(PreprocessParams.model_fields)
        unknown = sorted(set(space) - known)
        if unknown:
            raise ValueError(f"not training parameters: {unknown} (known: {sorted(known)})")
        return space


class PromoteParams(_Section):
    # paired: challenger and champion on the same rows (test split + labelled shadow rows),
    # exact one-sided McNemar test, a minimum effect and per-class non-regression;
    # margin: the simpler rule, test accuracy higher by more than `margin`.
    test: Literal["paired", "margin"] = "paired"
    # margin rule: a challenger must beat the champion's test accuracy by more than this;
    # 0 means any strict gain (a tie keeps the champion).
    margin: float = Field(default=0.0, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)  # paired: the test's significance level
    min_effect: float = Field(default=0.0, ge=0, le=1)  # paired: least accuracy gain
    max_class_drop: float = Field(default=0.05, ge=0, le=1)  # paired: largest recall drop
    shadow_labels: bool = True  # paired: add labelled rows the challenger scored in shadow


class MonitorParams(_Section):
    min_new_labels: int = Field(default=200, ge=1)  # retrain when this many new labels arrived
    drift_threshold: float = Field(default=0.2, gt=0, le=1)  # ... or this share of features
    # drifted (pipeline/drift.py: a KS test per feature) ...
    cooldown_s: float = Field(default=600, ge=0)  # ... and not within this long of the last run
    window_s: float = Field(default=3600, gt=0)  # the drift check compares the last hour's traffic
    # --- performance under label delay (pipeline/performance.py) ---
    perf_window_s: float = Field(default=3600, gt=0)  # coverage and accuracy per window
    min_coverage: float = Field(default=0.5, gt=0, le=1)  # a window this labelled is mature ...
    label_delay_s: float = Field(default=86_400, ge=0)  # ... or one that ended this long ago
    min_labels: int = Field(default=30, ge=1)  # labels before a realized accuracy is shown
    # --- drift without false alarms (pipeline/drift.py) ---
    false_alarm_rate: float = Field(default=0.05, gt=0, lt=1)  # BH level across features
    min_effect: float = Field(default=0.1, gt=0, le=1)  # least per-feature shift that counts
    persistence: int = Field(default=3, ge=1)  # consecutive drifted windows before an alarm
    # --- retraining triggers ---
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)  # retrain below this ...
    max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)  # ... or this far below test
    drift_retrains: bool = False  # persistent drift alone triggers (else with an estimated drop)


class RolloutParams(_Section):
    """A canary's share and guard rails (`mlops rollout start`); stored with the rollout, so
    every server process judges it by the same figures."""

    fraction: float = Field(default=0.1, gt=0, lt=1)  # share of clients sent to the candidate
    window_s: float = Field(default=300, gt=0)  # guards passed this long (and enough rows): promote
    check_interval_s: float = Field(default=2.0, gt=0)  # how often servers evaluate the guards
    min_samples: int = Field(default=200, ge=1)  # candidate rows before any guard may decide
    max_error_rate: float = Field(default=0.01, ge=0, le=1)  # failed candidate rows / its rows
    # p99 latency of the candidate at most this multiple of the champion's (same period) ...
    max_p99_ratio: float = Field(default=2.0, ge=1)
    p99_slack_ms: float = Field(default=5.0, ge=0)  # ... plus this, so noise at 1 ms cannot trip it
    min_labels: int = Field(default=50, ge=1)  # labelled rows of each before accuracy counts
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)  # candidate vs champion
    # promote only once accuracy was judged (both have min_labels labelled rows): where the
    # labels are sure to come, a window that ends before they do must not promote unjudged
    require_labels: bool = False


class ScheduleParams(_Section):
    retrain_cron: str = "0 3 * * *"  # `mlops schedule`: nightly, when traffic is low
    monitor_interval_s: int = Field(default=300, ge=1)  # the monitor every 5 minutes


class Params(_Section):
    """The typed contents of params.yaml."""

    seed: int = 42  # every split, initialisation, sampler and augmentation derives from it
    data: DataParams = Field(default_factory=DataParams)
    split: SplitParams = Field(default_factory=SplitParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    train: TrainSection = Field(default_factory=TrainSection)
    tune: TuneParams = Field(default_factory=TuneParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    schedule: ScheduleParams = Field(default_factory=ScheduleParams)

    def updated(self, **sections: dict[str, Any]) -> Params:
        """A copy with some fields of some sections replaced, validated again:
        `params.updated(data={"source": "x.csv"}, seed=7)`."""
        merged = self.model_dump()
        for key, value in sections.items():
            if isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Params.model_validate(merged)


# `mlops run` and the loop flow: round 2 is the first to train on round 1's feedback, the
# least that shows the loop closing.
LOOP_ROUNDS = 2


class ParamsError(ValueError):
    """params.yaml is not valid YAML or does not fit the schema."""


def load_params(path: Path | None = None) -> Params:
    """Read params.yaml; a missing file or key takes the defaults above."""
    path = path or get_settings().params_path
    if not path.exists():
        return Params()
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    try:
        return Params.model_validate(loaded)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ParamsError(f"{path}: {problems}") from exc


# --- deployment settings ------------------------------------------------------------------

# A source file above this is refused before it is read: pandas needs ~2-3x a CSV's size.
MAX_INGEST_BYTES = 2 * 1024**3


def sqlalchemy_url(url: str) -> str:
    """A database URL in the form SQLAlchemy needs: psycopg 3 is the PostgreSQL driver we
    ship, so `postgresql://` and `postgres://` (what most tools print) name it explicitly."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


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
    max_ingest_bytes: int = Field(
        default=MAX_INGEST_BYTES, description="larger source files are refused before reading"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # --- serving ---
    model_ref: str = Field(default="champion", description="alias or version number to serve")
    reload_interval_s: float = Field(default=10.0, description="poll the alias (0: never)")
    max_rows_per_request: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    # The HTTP guard (serving/protocol.py): a request head larger than this or with more
    # header lines gets 431; a head not complete within header_timeout_s, or a body that
    # stalls for body_timeout_s, closes the connection (408); the rest of a body over
    # max_body_bytes is read and dropped up to linger_bytes so a client that sends it
    # all before reading still gets its 413, and a larger one is refused at once.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    linger_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_connections: int = Field(default=2048, ge=1)  # uvicorn's limit_concurrency: then 503
    serve_workers: int = Field(
        default=1,
        ge=1,
        description="server worker processes (`mlops serve --workers` sets it for its "
        "workers): each checkpoints a SQLite log this many times as seldom",
    )
    # a pass of 512 rows cost 40% more per row than one of 256 (default ConvNet, 2 cores)
    batch_max_rows: int = 256
    batch_max_wait_ms: float = 2.0
    # A pass this small runs on the event loop itself instead of the inference thread: its
    # forward is mostly per-op overhead that holds the GIL anyway, and the two hand-offs
    # between threads and the GIL contention cost more than it (1-row requests at
    # concurrency 8: 1.15-1.3x req/s, -20-35% CPU per request; larger passes keep the
    # thread, whose kernels release the GIL while the loop parses the next requests)
    batch_inline_rows: int = Field(default=32, ge=0)
    log_mode: Literal["durable", "async", "off"] = Field(
        default="durable",
        description="durable: answer after the log commit; async: before it; "
        "off: no prediction log (benchmarks only: breaks the feedback loop)",
    )
    log_queue_max: int = 50_000
    out_of_range: Literal["flag", "refuse", "off"] = Field(
        default="flag",
        description="rows unlike the training data (other units, other ranges): flag them "
        "in the answer and on /metrics, refuse the request (422), or do not check",
    )
    api_url: str | None = Field(
        default=None,
        description="a running prediction server the loop deploys to "
        "(with MLOPS_ADMIN_TOKEN); unset: the loop starts its own",
    )
    train_processes: int = Field(
        default=1, description="> 1: train with torchrun DDP over this many processes"
    )
    dask_address: str | None = Field(
        default=None,
        description="a Dask scheduler (tcp://host:8786) that runs the streaming data stages' "
        "parts, through Prefect's Dask task runner; unset: this process",
    )
    torch_threads: int = Field(default=0, description="0: one per core, minus the event loop's")
    otel: bool = Field(
        default=False,
        description="FastAPI's OpenTelemetry spans and metrics, for an OTel SDK you configure; "
        "off, the server skips that per-request check (/metrics is always on)",
    )
    shadow_model: str | None = Field(
        default=None,
        description="score requests with this version or alias too (e.g. challenger), off the "
        "response path, and log its answers under the same ids (unset: no shadow)",
    )
    shadow_fraction: float = Field(default=1.0, ge=0, le=1, description="share of requests")
    shadow_max_pending_rows: int = Field(
        default=10_000, ge=1, description="rows waiting for the shadow; more are skipped"
    )
    rollout_poll_s: float = Field(
        default=1.0, ge=0, description="how often a server reads the running canary (0: never)"
    )
    fast_path: bool = Field(
        default=True,
        description="serve POST /predict and /invocations straight from ASGI, past FastAPI's "
        "routing and dependencies (same checks, same answers); false: through FastAPI",
    )

    @field_validator("prediction_db_url")
    @classmethod
    def _driver_url(cls, url: str | None) -> str | None:
        return sqlalchemy_url(url) if url else url

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
    def downloads_dir(self) -> Path:
        """Downloaded sources (`mnist`), each checked and kept for the next run."""
        return self.data_dir / "downloads"

    @property
    def stream_dir(self) -> Path:
        """The production stream the loop's simulated clients send (pipeline/stream.py)."""
        return self.data_dir / "stream"

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
