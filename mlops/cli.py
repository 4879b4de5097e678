"""The `mlops` command: thin wrappers over pipeline/, flows/ and serving/.

Heavy imports (torch, MLflow, Prefect) stay inside the commands, so `mlops --help` and a
mistyped option answer at once.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import LOOP_ROUNDS

app = typer.Typer(
    help="A closed ML loop: data -> training -> registry -> serving -> feedback -> data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("mlops")
_debug = False  # --debug: full tracebacks instead of one line


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    debug: Annotated[bool, typer.Option(help="full tracebacks instead of one line")] = False,
) -> None:
    """Configure logging once, for every command."""
    from rich.logging import RichHandler

    global _debug
    _debug = debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    from pipeline import redact

    redact.install()
    for noisy in (
        "alembic",
        "mlflow.store.db.utils",  # "Creating initial MLflow database tables..." on a new store
        "mlflow.pyfunc",  # "Validating input example against model signature" per model
        "httpx",
        "urllib3",
        "git",
        "filelock",
        "dvc",
        "dvc_data",
        "dvc_objects",
        "scmrepo",
        "matplotlib",  # "generated new fontManager" on a first plot
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Without PREFECT_API_URL, Prefect starts a temporary server for the command and gives up
    # after 20 s, which a loaded 2-core machine can pass (its database migrations alone take
    # seconds): wait longer before failing. Set before prefect is first imported.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _fail(message: str, code: int = 1) -> typer.Exit:
    from pipeline.redact import redact

    typer.secho(f"error: {redact(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _config():
    """Settings and params.yaml, or one clear line on what is wrong with them."""
    from pydantic import ValidationError

    from pipeline.config import ParamsError, get_settings, load_params

    try:
        settings = get_settings()
        return settings, load_params(settings.params_path)
    except ValidationError as exc:  # MLOPS_* variables that do not fit Settings
        raise _fail(f"settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    except ParamsError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def ingest(
    source: Annotated[
        str | None,
        typer.Option(help="digits, mnist, a CSV/Parquet file (.csv.gz, .zip) or a directory"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="snapshot name under data/raw/")] = None,
    allow_schema_change: Annotated[
        bool, typer.Option(help="replace data with other columns or value scale")
    ] = False,
    dask_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="a large Parquet source's parts validated on a Dask LocalCluster of this many "
            "workers; 0: in this process; unset: on MLOPS_DASK_ADDRESS's cluster if set",
        ),
    ] = None,
) -> None:
    """Read and validate a source into an immutable raw snapshot (bad rows quarantined).
    A source of more rows than data.streaming_above_rows is read chunk by chunk."""
    from pipeline.stages import ingest as run_ingest
    from pipeline.stages import source_streams

    settings, params = _config()
    source = source or params.data.source
    with _user_errors():
        cluster = _dask(settings, dask_workers)
        if cluster and source_streams(source, params):
            from flows.data import ingest_dask

            report = ingest_dask(
                str(Path(source).resolve()), settings.raw_dir, settings.quarantine_dir, params,
                name, allow_schema_change, *cluster,
            )  # fmt: skip
        else:
            report = run_ingest(
                source,
                settings.raw_dir,
                settings.quarantine_dir,
                params,
                name=name,
                max_bytes=settings.max_ingest_bytes,
                allow_schema_change=allow_schema_change,
                download_dir=settings.downloads_dir,
            )
    _write_ingest_report(settings, report)
    typer.echo(
        f"{report.rows_ok} rows -> {report.snapshot} ({report.rows_quarantined} quarantined), "
        f"md5 {report.data_hash}"
    )


def _write_ingest_report(settings, report) -> None:
    """data/reports/ingest.json, paths relative to the root: the same on every clone."""
    from pipeline.ingest import write_json_atomic

    data = report.to_dict()
    data["snapshot"] = os.path.relpath(report.snapshot, settings.root)
    write_json_atomic(data, settings.reports_dir / "ingest.json")


@app.command()
def preprocess(
    name: Annotated[str | None, typer.Option(help="snapshot name under data/raw/")] = None,
    dask_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="a large snapshot's parts on a Dask LocalCluster of this many workers; "
            "0: in this process; unset: on MLOPS_DASK_ADDRESS's cluster if set",
        ),
    ] = None,
) -> None:
    """Split the raw snapshot and fit the preprocessor on the training split (part by part
    for a snapshot of more rows than data.streaming_above_rows)."""
    from pipeline.ingest import DataFileError, check_name
    from pipeline.stages import preprocess as run_preprocess
    from pipeline.stages import should_stream

    settings, params = _config()
    try:
        raw = settings.raw_dir / f"{check_name(name or params.data.name)}.parquet"
    except DataFileError as exc:
        raise _fail(str(exc)) from exc
    if not raw.exists():
        raise _fail(f"{raw} does not exist: run `mlops ingest` first")
    cluster = _dask(settings, dask_workers)
    if cluster and should_stream(raw, params):
        from flows.data import preprocess_dask

        report = preprocess_dask(raw.resolve(), settings.processed_dir.resolve(), params, *cluster)
    else:
        report = run_preprocess(raw, settings.processed_dir, params)
    typer.echo(json.dumps(report["rows"]))


def _dask(settings, workers: int | None) -> tuple[str | None, int] | None:
    """(scheduler address, LocalCluster workers) for the data stages' parts, None for this
    process: an explicit --dask-workers wins (0: here; N: a LocalCluster of N), else
    MLOPS_DASK_ADDRESS's cluster when it is set."""
    if workers is not None:
        return (None, workers) if workers > 0 else None
    return (settings.dask_address, 2) if settings.dask_address else None


@contextmanager
def _user_errors():
    """What a user can fix (bad data, an unknown version, a registry or store that is down)
    becomes one clear line and exit 1; `--debug` shows the traceback instead."""
    from pipeline.batch import BatchError
    from pipeline.config import ParamsError
    from pipeline.ingest import DataFileError
    from pipeline.lineage import DataVersionError
    from pipeline.registry import RegistryError
    from pipeline.store import StoreUnavailable
    from pipeline.tracking import RegistryUnavailable
    from pipeline.validate import SchemaError

    try:
        yield
    except (
        BatchError,
        DataFileError,
        DataVersionError,
        ParamsError,
        RegistryError,
        RegistryUnavailable,
        SchemaError,
        StoreUnavailable,
    ) as exc:
        if _debug:
            raise
        raise _fail(str(exc)) from exc


class _FailuresOnlyOnce(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback, then the state it ended
    in; the command prints the one line that matters, so the console drops those records
    (Prefect's own run logs, in its API and UI, keep them). Off with --debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return True
        failed = record.getMessage().startswith(
            ("Finished in state Failed", "Finished in state Crashed")
        )
        return record.levelno < logging.ERROR and not failed


def _quiet_prefect_failures() -> None:
    if not _debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_FailuresOnlyOnce())


@app.command()
def train(
    trials: Annotated[int | None, typer.Option(min=0, help="Optuna trials (0: no tuning)")] = 0,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    warm_start: Annotated[bool | None, typer.Option("--warm-start/--cold-start")] = None,
    register: Annotated[bool, typer.Option(help="register the model in MLflow")] = True,
    promote: Annotated[bool, typer.Option(help="promote if it beats the champion")] = True,
    progress: Annotated[bool, typer.Option(help="show per-epoch progress bars")] = True,
) -> None:
    """Train on data/processed (optionally tune first), evaluate, log, register, promote."""

    from pipeline.preprocess import split_path

    settings, params = _config()
    if not split_path(settings.processed_dir, "train").exists():
        raise _fail("no processed data: run `mlops ingest` and `mlops preprocess` first")
    ingested = settings.reports_dir / "ingest.json"
    source_hash = ""
    if ingested.exists():  # the run is tagged with the source really ingested
        report = json.loads(ingested.read_text())
        params = params.updated(data={"source": report["source"]})
        source_hash = report.get("source_hash", "")
    warm = params.train.warm_start if warm_start is None else warm_start
    _train_and_promote(
        settings, params, trials or 0, epochs, warm, register, promote, progress, source_hash
    )


def _train_and_promote(
    settings,
    params,
    trials: int,
    epochs: int | None,
    warm: bool,
    register: bool,
    promote: bool,
    progress: bool,
    source_hash: str = "",
) -> dict:
    from pipeline.experiment import fit
    from pipeline.gate import promote_on_test_split

    row: dict = {}
    with _user_errors():
        cand = fit(
            settings,
            params,
            trials=trials,
            epochs=epochs,
            warm_start=warm,
            register_model=register,
            show_progress=progress,
            source_hash=source_hash,
        )
        row = {
            "run": cand.run_id,
            "version": cand.version,
            "accuracy": cand.metrics["accuracy"],
            "promoted": False,
        }
        line = f"run {cand.run_id}: test accuracy {cand.metrics['accuracy']:.4f}"
        if cand.version:
            line += f", registered as {settings.model_name} v{cand.version}"
        typer.echo(line)
        if cand.version and promote:
            decision = promote_on_test_split(settings, params, cand.version)
            verdict = "promoted to @champion" if decision.promoted else "kept as @challenger"
            typer.echo(f"v{cand.version} {verdict}: {decision.reason}")
            row["promoted"] = decision.promoted
    return row


@app.command()
def evaluate(
    cv: Annotated[int | None, typer.Option(min=2, help="k-fold cross-validation instead")] = None,
) -> None:
    """Evaluate models/ on the test split (metrics.json, confusion matrix), or k-fold CV."""
    import pandas as pd

    from pipeline.evaluate import classification_metrics, confusion_matrix_png
    from pipeline.experiment import cross_validate
    from pipeline.ingest import write_json_atomic
    from pipeline.model import Predictor
    from pipeline.preprocess import raw_test_set

    settings, params = _config()
    if cv:
        raw = settings.raw_dir / f"{params.data.name}.parquet"
        if not raw.exists():
            raise _fail(f"{raw} does not exist: run `mlops ingest` first")
        result = cross_validate(pd.read_parquet(raw), params, cv)
        typer.echo(
            f"{cv}-fold accuracy {result['accuracy_mean']:.4f} +/- {result['accuracy_std']:.4f}"
        )
        write_json_atomic(result, settings.reports_dir / "cv.json")
        return
    try:
        predictor = Predictor.from_dir(settings.models_dir)
    except FileNotFoundError as exc:
        raise _fail(f"{exc}: run `mlops train` first") from exc
    x, y = raw_test_set(settings.processed_dir, predictor.preprocessor.schema)
    probs = predictor.predict_proba(x)
    metrics = classification_metrics(y, probs, predictor.cfg.num_classes)
    write_json_atomic(
        {k: metrics[k] for k in ("accuracy", "macro_f1", "log_loss", "n")},
        settings.root / "metrics.json",
    )
    write_json_atomic(metrics["per_class"], settings.reports_dir / "per_class.json")
    confusion_matrix_png(
        y, probs.argmax(1), predictor.cfg.num_classes, settings.reports_dir / "confusion_matrix.png"
    )
    typer.echo(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")


@app.command()
def run(
    rounds: Annotated[int, typer.Option(min=1)] = LOOP_ROUNDS,
    source: Annotated[str | None, typer.Option(help="digits or a CSV/Parquet path")] = None,
    trials: Annotated[int | None, typer.Option(min=0, help="Optuna trials per round")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    drift: Annotated[bool, typer.Option(help="distort the production stream")] = False,
    allow_schema_change: Annotated[
        bool, typer.Option(help="replace data with other columns or value scale")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="only warnings, errors and the results table")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="debug lines and Prefect's own per-task lines")
    ] = False,
    faulty_candidate: Annotated[
        bool,
        typer.Option(
            help="train round 2's candidate badly and send it to the canary anyway, to see "
            "the guard rails roll it back"
        ),
    ] = False,
    label_budget: Annotated[
        int | None,
        typer.Option(min=1, help="label only this many rows a round (default: all of them)"),
    ] = None,
    label_strategy: Annotated[
        str, typer.Option(help="which rows a budget labels: uncertainty, margin, random")
    ] = "uncertainty",
) -> None:
    """Run the whole loop for N rounds (a Prefect flow) and print one row per round.

    Shows the round, the running step, tuning trials and epochs live; each finished step
    stays as one line with its time."""
    from contextlib import ExitStack

    from rich import get_console

    from mlops.live import RunDisplay, quiet_prefect_steps
    from mlops.render import loop_table

    if quiet and verbose:
        raise _fail("--quiet and --verbose exclude each other", code=2)
    from pipeline.labelqueue import STRATEGIES

    if label_strategy not in STRATEGIES:
        raise _fail(f"--label-strategy must be one of {', '.join(STRATEGIES)}", code=2)
    settings, params = _config()
    from pipeline.ingest import check_source

    with _user_errors():  # a bad source fails now, not after Prefect's server has started
        check_source(source or params.data.source, settings.max_ingest_bytes)
    _prefect_env()
    from flows.loop import loop_flow  # imports Prefect, which configures its loggers

    root = logging.getLogger()
    if quiet:
        root.setLevel(logging.WARNING)
        for name in ("prefect", "pipeline", "flows", "mlops"):
            logging.getLogger(name).setLevel(logging.WARNING)
    elif verbose:
        root.setLevel(logging.DEBUG)

    _quiet_prefect_failures()
    console = get_console()  # the one the log handler prints on, so lines land above the rows
    if not verbose:
        quiet_prefect_steps()
    with _user_errors(), ExitStack() as stack:
        if not quiet:
            stack.enter_context(RunDisplay(console, rounds))
        rows = loop_flow(
            rounds=rounds,
            source=source or params.data.source,
            trials=trials,
            epochs=epochs,
            drift=drift,
            params=params,
            allow_schema_change=allow_schema_change,
            faulty_candidate=faulty_candidate,
            label_budget=label_budget,
            label_strategy=label_strategy,
        )
    console.print(loop_table(settings.model_name, rows))


def _prefect_env() -> None:
    """Prefect's own settings: no telemetry, and our library's logs in its run logs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")


@app.command()
def predict(
    source: Annotated[Path, typer.Argument(help="a CSV or Parquet file of feature rows")],
    out: Annotated[
        Path | None, typer.Option(help="CSV or Parquet (default: SOURCE.predictions.EXT)")
    ] = None,
    model: Annotated[str, typer.Option(help="alias or version number")] = "champion",
    log_rows: Annotated[
        bool, typer.Option("--log", help="log the rows so labels can come back via /feedback")
    ] = False,
    id_column: Annotated[str, typer.Option(help="column of row ids, kept in the output")] = "id",
    chunk_rows: Annotated[
        int, typer.Option(min=1, help="rows per forward pass (read in blocks of >= 4,096)")
    ] = 8192,
) -> None:
    """Score a file of any size in chunks: label and probabilities per row, written to OUT."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pipeline.batch import predict_file, total_rows
    from pipeline.registry import load_predictor
    from pipeline.store import PredictionStore
    from pipeline.tracking import configure_tracking

    settings, _ = _config()
    out = out or source.with_name(f"{source.stem}.predictions{source.suffix or '.csv'}")
    if out.resolve() == source.resolve():
        raise _fail("--out must not be the input file")
    with _user_errors():
        configure_tracking(settings)
        predictor, mv = load_predictor(settings.model_name, model)
        store = PredictionStore(settings.prediction_db).create() if log_rows else None
        total = total_rows(source) if source.is_file() else None
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        columns += [TextColumn("{task.completed:,.0f} rows"), TimeElapsedColumn()]
        with Progress(*columns, transient=True) as bar:
            # --log reads the file twice: every row is checked before any is logged
            check = bar.add_task("checking rows", total=total, visible=log_rows)
            task = bar.add_task(f"scoring with v{mv.version}", total=total)
            result = predict_file(
                source,
                out,
                predictor,
                settings.model_name,
                str(mv.version),
                id_column=id_column,
                chunk_rows=chunk_rows,
                store=store,
                on_chunk=lambda n: bar.advance(task, n),
                on_checked=lambda n: bar.advance(check, n),
            )
    line = (
        f"{result.rows:,} rows scored by {settings.model_name} v{mv.version} in "
        f"{result.seconds:.1f} s ({result.rows_per_s:,.0f} rows/s) -> {result.output}"
    )
    if log_rows:
        line += f"; {result.logged:,} logged (ids in column {id_column!r})"
        if result.already_logged:
            line += (
                f"; {result.already_logged:,} were in the log already under their ids, from an"
                " earlier run of the same rows (the log keeps that run's predictions)"
            )
    typer.echo(line)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="default: MLOPS_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="default: MLOPS_PORT")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="uvicorn worker processes (default: MLOPS_SERVE_WORKERS, 1)"),
    ] = None,
    model: Annotated[str | None, typer.Option(help="alias or version (default champion)")] = None,
    access_log: Annotated[bool, typer.Option(help="uvicorn's per-request log lines")] = False,
) -> None:
    """Start the prediction server (FastAPI + uvicorn) on the champion."""
    import tempfile

    import uvicorn

    settings, _ = _config()
    if model:
        os.environ["MLOPS_MODEL_REF"] = model
    os.environ.setdefault("MLOPS_ROOT", str(settings.root))
    workers = workers or settings.serve_workers
    # each worker's Settings: how many processes share the prediction log
    os.environ["MLOPS_SERVE_WORKERS"] = str(workers)
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mlops-metrics-")
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        log_level="info",
        access_log=access_log,
        timeout_graceful_shutdown=30,
        http="serving.protocol:GuardedHttpTools",  # head/body bounds and timeouts
        limit_concurrency=settings.max_connections,
    )


@app.command()
def schedule(
    port: Annotated[
        int, typer.Option(help="port of the Prefect server started when none is configured")
    ] = 4200,
) -> None:
    """Serve the retraining (cron) and monitor (interval) deployments on a Prefect API.

    Uses PREFECT_API_URL; when it is unset, starts `prefect server start` on 127.0.0.1:PORT
    (its UI then talks to that port: PREFECT_UI_API_URL is set to match).
    """
    settings, params = _config()
    _prefect_env()
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = _start_prefect_server(settings, port)
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments

    deployments = build_deployments(params)
    typer.echo(
        f"serving {', '.join(d.name for d in deployments)} on "
        f"{os.environ['PREFECT_API_URL']} (UI: {os.environ['PREFECT_API_URL'][:-4]})"
    )
    prefect_serve(*deployments)


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Prefect process work pool to serve")] = "mlops",
    register: Annotated[bool, typer.Option(help="(re-)register the deployments first")] = True,
) -> None:
    """Run flows on this machine: register the loop/retrain/monitor deployments on a process
    work pool and start a Prefect worker polling it (needs PREFECT_API_URL)."""
    import subprocess
    import sys

    _, params = _config()
    _prefect_env()
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail("set PREFECT_API_URL to the Prefect server the worker should poll")
    if register:
        from flows.deployments import register_on_pool

        register_on_pool(pool, params)
        typer.echo(f"deployments loop, retrain, monitor registered on work pool {pool!r}")
    raise typer.Exit(
        subprocess.call(
            [
                str(Path(sys.executable).parent / "prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
            ]
        )
    )


def _start_prefect_server(settings, port: int = 4200) -> str:
    """The Prefect server on 127.0.0.1:PORT: the one running there, or a new one left
    running in the background (schedules need it to outlive this command). Its UI is told
    the same port (PREFECT_UI_API_URL), or it would call 4200."""
    import sys

    from pipeline import process

    url = f"http://127.0.0.1:{port}/api"
    if process.is_healthy(url + "/health", timeout=2):
        return url
    prefect = str(Path(sys.executable).parent / "prefect")
    log_path = settings.data_dir / "prefect-server.log"
    server = process.start(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        url,
        log_path,
        env={**os.environ, "PREFECT_UI_API_URL": url},
    )
    try:
        server.wait_healthy("/health")
    except process.ProcessFailed as exc:
        raise _fail(f"the Prefect server did not start; see {log_path}") from exc
    typer.echo(f"started a Prefect server at {url[:-4]} (log: {log_path})")
    return url


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Champion, challenger (with data versions) and the recent promotion ledger."""
    from mlops.render import print_status
    from pipeline.registry import status as registry_status
    from pipeline.tracking import configure_tracking

    settings, params = _config()
    with _user_errors():
        configure_tracking(settings)
        info = registry_status(settings)
        info.update(_serving_status(settings, params))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    print_status(info)


def _serving_status(settings, params) -> dict:
    """The shadow's agreement and accuracy on the same labelled rows, the canary, and live
    performance per version and window (the last day), from the prediction store (or why
    they cannot be read)."""
    import time

    from pipeline import monitor, rollout
    from pipeline.store import PredictionStore, StoreUnavailable

    store = PredictionStore(settings.prediction_db)
    try:
        store.create()
        since = time.time() - 24 * params.monitor.perf_window_s
        return {
            "shadow": store.shadow_summary(settings.model_name),
            "rollout": rollout.status(settings),
            "performance": [w.to_dict() for w in monitor.performance(settings, params, since)],
        }
    except StoreUnavailable as exc:
        return {"shadow": None, "rollout": None, "performance": None, "store_error": str(exc)}
    finally:
        store.dispose()


@app.command("pull-feedback")
def pull_feedback(
    version: Annotated[
        bool, typer.Option(help="version data/loop with DVC (dvc add + push) when rows came in")
    ] = True,
) -> None:
    """Pull the labelled predictions logged since the last pull into data/loop/feedback.parquet
    (validated against the processed data's schema, bad rows quarantined) and version
    data/loop with DVC: the retrain flow's first steps, without retraining."""
    from pipeline.feedback import pull_feedback as pull
    from pipeline.lineage import ensure_dvc_repo, version_data
    from pipeline.preprocess import PREPROCESSOR_FILE, load_preprocessor
    from pipeline.store import PredictionStore

    settings, params = _config()
    if not (settings.processed_dir / PREPROCESSOR_FILE).exists():
        raise _fail(
            f"no processed data in {settings.processed_dir} (its schema checks the labelled "
            "rows): run `mlops run`, or `mlops ingest` and `mlops preprocess`, first"
        )
    with _user_errors():
        schema = load_preprocessor(settings.processed_dir).schema
        store = PredictionStore(settings.prediction_db)
        try:
            report = pull(
                store,
                settings.loop_dir,
                schema,
                settings.quarantine_dir,
                chunk_rows=params.data.chunk_rows,
            )
        finally:
            store.dispose()
        digest = None
        if report.new and version:
            ensure_dvc_repo(settings.root)
            digest = version_data(settings.root, settings.loop_dir)
    typer.echo(
        f"{report.pulled:,} labelled rows read, {report.new:,} new or relabelled, "
        f"{report.quarantined:,} quarantined; {report.total_feedback:,} in "
        f"{settings.loop_dir / 'feedback.parquet'}"
    )
    if digest:
        typer.echo(f"data version {digest} (data/loop.dvc: commit it to share the version)")
    elif report.new:
        typer.echo("not versioned (--no-version): run `dvc add data/loop` to version it")
    else:
        typer.echo("nothing new: the data version is unchanged")


@app.command("label-queue")
def label_queue(
    budget: Annotated[int, typer.Option(min=1, help="how many rows to label")] = 100,
    strategy: Annotated[
        str, typer.Option(help="uncertainty | margin | disagreement | random")
    ] = "uncertainty",
    out: Annotated[
        Path | None, typer.Option(help="write CSV or JSON (by extension) instead of a table")
    ] = None,
    seed: Annotated[int, typer.Option(help="for --strategy random")] = 0,
) -> None:
    """The logged predictions most worth labelling, with their ids for /feedback."""
    from pipeline.labelqueue import STRATEGIES, rank
    from pipeline.store import PredictionStore

    if strategy not in STRATEGIES:
        raise _fail(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise _fail(f"--out must end in .csv or .json, got {out.name}")
    settings, _ = _config()
    store = PredictionStore(settings.prediction_db)
    with _user_errors():
        try:
            rows = store.create().unlabelled(settings.model_name)
        finally:
            store.dispose()
    queue = rank(rows, strategy, budget, seed)
    picked = [
        {
            "id": r["id"],
            "label": None,  # to fill in, then POST to /feedback
            "predicted": int(r["label"]),
            "model_version": r["model_version"],
            "score": round(r["score"], 6),
            "shadow_label": r.get("shadow_label"),
        }
        for r in queue
    ]
    if out is None:
        for r in picked:
            typer.echo(f"{r['id']}  predicted {r['predicted']}  v{r['model_version']}  "
                       f"score {r['score']:.4f}")  # fmt: skip
        typer.echo(f"{len(picked)} of {len(rows)} unlabelled rows, by {strategy}")
        return
    if out.suffix.lower() == ".json":
        # /feedback's own shape: fill each label in and POST the file
        body = {"labels": [{"id": r["id"], "label": None} for r in picked], "queue": picked}
        out.write_text(json.dumps(body, indent=2))
    else:
        import csv

        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(picked[0]) if picked else ["id", "label"])
            writer.writeheader()
            writer.writerows(picked)
    typer.echo(f"wrote {len(picked)} rows to label (of {len(rows)} unlabelled) to {out}")


rollout_app = typer.Typer(
    help="Canary rollouts: a candidate takes a share of the clients, guard rails decide.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("start")
def rollout_start(
    version: Annotated[str, typer.Argument(help="version number or alias, e.g. challenger")],
    fraction: Annotated[
        float | None, typer.Option(help="share of clients (default: params' rollout.fraction)")
    ] = None,
    window: Annotated[
        float | None, typer.Option(help="seconds within the guard rails before promotion")
    ] = None,
) -> None:
    """Send a share of the traffic to VERSION; the servers promote it or roll it back."""
    from pipeline import rollout
    from pipeline.tracking import configure_tracking

    settings, params = _config()
    guards = params.rollout
    if window is not None:
        guards = guards.model_copy(update={"window_s": window})
    if fraction is not None and not 0 < fraction < 1:
        raise _fail(f"--fraction must be between 0 and 1 (exclusive), got {fraction}")
    with _user_errors():
        configure_tracking(settings)
        started = rollout.start(settings, version, guards, fraction)
    typer.echo(
        f"canary: v{started['candidate']} takes {started['fraction']:.0%} of clients beside "
        f"@champion v{started['champion']}; promoted after {started['window_s']:g} s within "
        "the guard rails"
        + (" and once accuracy was judged on labels" if guards.require_labels else "")
        + ", rolled back at once on a breach (`mlops rollout status`)"
    )


@rollout_app.command("status")
def rollout_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The running canary and its guard figures, or how the last one ended."""
    from mlops.render import rollout_lines
    from pipeline import rollout

    settings, _ = _config()
    with _user_errors():
        info = rollout.status(settings)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for line in rollout_lines(info):
        typer.echo(line)


def _finish(action: str, reason: str) -> None:
    from pipeline import rollout
    from pipeline.tracking import configure_tracking

    settings, _ = _config()
    with _user_errors():
        configure_tracking(settings)
        ended = rollout.finish(settings, action, reason)
    verb = "promoted to @champion" if action == "promote" else "rolled back"
    typer.echo(f"canary v{ended['candidate']} {verb}")


@rollout_app.command("promote")
def rollout_promote() -> None:
    """Promote the running canary now, whatever its guard figures."""
    _finish("promote", "promoted by hand")


@rollout_app.command("abort")
def rollout_abort() -> None:
    """Roll the running canary back now: the champion takes all traffic."""
    _finish("abort", "aborted by hand")


@app.command()
def promote(version: str) -> None:
    """Make VERSION the champion (recorded in the ledger)."""
    from pipeline.registry import set_champion
    from pipeline.tracking import configure_tracking

    settings, _ = _config()
    with _user_errors():
        configure_tracking(settings)
        set_champion(settings, version)
    typer.echo(f"{settings.model_name} v{version} is now @champion")


@app.command()
def rollback() -> None:
    """Make the previous champion the champion again (recorded in the ledger)."""
    from pipeline.registry import rollback as registry_rollback
    from pipeline.tracking import configure_tracking

    settings, _ = _config()
    with _user_errors():
        configure_tracking(settings)
        current, target = registry_rollback(settings)
    typer.echo(f"rolled back {settings.model_name}: @champion v{current} -> v{target}")


@app.command()
def ui(
    port: Annotated[int, typer.Option()] = 5000,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the project's tracking store."""
    import subprocess
    import sys

    settings, _ = _config()
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        typer.echo(f"MLflow runs as a server already: open {uri}")
        _ui_pages(settings, uri)
        return
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        settings.artifact_location,
        "--host",
        host,
        "--port",
        str(port),
    ]
    typer.echo(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it")
    _ui_pages(settings, f"http://{host}:{port}")
    raise typer.Exit(subprocess.call(cmd))


def _ui_pages(settings, base: str) -> None:
    """The pages worth opening: MLflow's UI otherwise lands on its GenAI home."""
    import mlflow

    from pipeline.ledger import ledger_name
    from pipeline.tracking import ui_runs_url

    mlflow.set_tracking_uri(settings.tracking_uri)
    pages = []
    try:
        for label, name in (("runs", settings.model_name), ("ledger", ledger_name(settings))):
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is not None:
                pages.append((label, ui_runs_url(base, experiment.experiment_id)))
    except Exception as exc:  # noqa: BLE001 - the UI still starts; the links are a help
        log.debug("no experiment links: %s", exc)
    if not pages:
        typer.echo("  (no runs yet: `mlops run` or `mlops train` makes them)")
        return
    pages.append(
        ("registry", f"{base}/#/models/{settings.model_name}?workflowType=machine_learning")
    )
    for label, url in pages:
        typer.echo(f"  {label:9}{url}")


@app.command()
def lineage(
    prediction_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Trace a prediction back: model version -> MLflow run -> git commit -> data version."""
    from mlops.render import lineage_lines
    from pipeline.reproduce import trace

    settings, _ = _config()
    with _user_errors():
        info = trace(settings, prediction_id)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for line in lineage_lines(info):
        typer.echo(line)


@app.command()
def reproduce(version: str) -> None:
    """Restore the exact data VERSION was trained on (through DVC) and retrain it on the CPU."""
    from pipeline.reproduce import reproduce as run_reproduce

    settings, params = _config()
    with _user_errors():
        out = run_reproduce(settings, params, version)
    typer.echo(f"data {out['data_hash']} restored to {out['data_dir']} (hash verified)")
    typer.echo(
        f"test accuracy: original {out['original_test_accuracy']}, "
        f"reproduced {out['reproduced_test_accuracy']}; "
        f"{out['predictions_differ']:,} of {out['test_rows']:,} test predictions differ: "
        f"{'identical' if out['match'] else 'DIFFERENT'}"
    )
    if not out["match"]:
        raise typer.Exit(3 if out["original_device"] == "cpu" else 0)


if __name__ == "__main__":
    app()
