"""The `mlops` command: thin wrappers over pipeline/ and flows/; heavy imports stay lazy."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="A closed ML loop: data -> training -> registry -> serving -> feedback -> data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("mlops")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Configure logging once, for every command."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("alembic", "httpx", "urllib3", "git", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _context():
    from pipeline.config import get_settings, load_params

    settings = get_settings()
    try:
        return settings, load_params(settings.params_path)
    except ValueError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def ingest(
    source: Annotated[
        str | None, typer.Option(help="digits, a CSV/Parquet file or a directory")
    ] = None,
    name: Annotated[str | None, typer.Option(help="snapshot name under data/raw/")] = None,
) -> None:
    """Read and validate a source into an immutable raw snapshot (bad rows quarantined)."""
    from pipeline.ingest import DataFileError
    from pipeline.ingest import ingest as run_ingest

    settings, params = _context()
    source = source or params["data"]["source"]
    try:
        report = run_ingest(source, settings.raw_dir, settings.quarantine_dir, params, name=name)
    except DataFileError as exc:
        raise _fail(str(exc)) from exc
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
) -> None:
    """Split the raw snapshot and fit the preprocessor on the training split."""
    from pipeline.preprocess import preprocess as run_preprocess

    settings, params = _context()
    raw = settings.raw_dir / f"{name or params['data']['name']}.parquet"
    if not raw.exists():
        raise _fail(f"{raw} does not exist: run `mlops ingest` first")
    report = run_preprocess(raw, settings.processed_dir, params)
    typer.echo(json.dumps(report["rows"]))


def _not_yet(what: str) -> typer.Exit:
    return _fail(f"`mlops {what}` is not available yet in this version", code=2)


def _registry_errors():
    """Turn registry failures into one clear line and exit 1."""
    from contextlib import contextmanager

    from pipeline.registry import RegistryError, RegistryUnavailable

    @contextmanager
    def guard():
        try:
            yield
        except (RegistryError, RegistryUnavailable) as exc:
            raise _fail(str(exc)) from exc

    return guard()


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

    settings, params = _context()
    if not (settings.processed_dir / "train.parquet").exists():
        raise _fail("no processed data: run `mlops ingest` and `mlops preprocess` first")
    warm = params["train"].get("warm_start", False) if warm_start is None else warm_start
    _train_and_promote(settings, params, trials or 0, epochs, warm, register, promote, progress)


def _train_and_promote(
    settings,
    params: dict,
    trials: int,
    epochs: int | None,
    warm: bool,
    register: bool,
    promote: bool,
    progress: bool,
) -> dict:
    from pipeline.experiment import fit, raw_test_set
    from pipeline.preprocess import Preprocessor
    from pipeline.registry import promote_if_better

    row: dict = {}
    with _registry_errors():
        cand = fit(
            settings,
            params,
            trials=trials,
            epochs=epochs,
            warm_start=warm,
            register=register,
            show_progress=progress,
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
            pre = Preprocessor.load(settings.processed_dir / "preprocessor.json")
            x, y = raw_test_set(settings, pre.schema)
            decision = promote_if_better(
                settings, cand.version, x, y, params.get("promote", {}).get("margin", 0.0)
            )
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

    from pipeline.evaluate import classification_metrics, confusion_matrix_png, cross_validate
    from pipeline.experiment import raw_test_set
    from pipeline.ingest import write_json_atomic
    from pipeline.model import Predictor

    settings, params = _context()
    if cv:
        raw = settings.raw_dir / f"{params['data']['name']}.parquet"
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
    x, y = raw_test_set(settings, predictor.preprocessor.schema)
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
    rounds: Annotated[int, typer.Option(min=1)] = 2,
    source: Annotated[str | None, typer.Option(help="digits or a CSV/Parquet path")] = None,
    trials: Annotated[int | None, typer.Option(min=0)] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run the whole loop for N rounds and print one summary row per round."""
    from pipeline.ingest import DataFileError
    from pipeline.ingest import ingest as run_ingest
    from pipeline.preprocess import preprocess as run_preprocess

    settings, params = _context()
    source = source or params["data"]["source"]
    try:
        report = run_ingest(source, settings.raw_dir, settings.quarantine_dir, params)
    except DataFileError as exc:
        raise _fail(str(exc)) from exc
    _write_ingest_report(settings, report)
    split = run_preprocess(Path(report.snapshot), settings.processed_dir, params)
    typer.echo(f"data version {report.data_hash[:10]}: {split['rows']}")
    trials = params.get("tune", {}).get("trials", 0) if trials is None else trials
    row = _train_and_promote(
        settings,
        params,
        trials,
        epochs,
        params["train"].get("warm_start", False),
        True,
        True,
        False,
    )
    typer.echo(
        f"round 1: data {report.data_hash[:10]}, rows {report.rows_ok}, "
        f"model v{row['version']}, test accuracy {row['accuracy']:.4f}, "
        f"promoted {'yes' if row['promoted'] else 'no'}"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="default MLOPS_HOST (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="default MLOPS_PORT (8000)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    model: Annotated[str | None, typer.Option(help="alias or version (default champion)")] = None,
) -> None:
    """Start the prediction server (FastAPI + uvicorn) on the champion."""
    import tempfile

    import uvicorn

    settings, _ = _context()
    if model:
        os.environ["MLOPS_MODEL_REF"] = model
    os.environ.setdefault("MLOPS_ROOT", str(settings.root))
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mlops-metrics-")
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        log_level="info",
        timeout_graceful_shutdown=30,
    )


@app.command()
def schedule() -> None:
    """Serve the Prefect deployments (scheduled retraining, monitor)."""
    raise _not_yet("schedule")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Champion, challenger (with data versions) and the recent promotion ledger."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.registry import configure_tracking
    from pipeline.registry import status as registry_status

    settings, _ = _context()
    with _registry_errors():
        configure_tracking(settings)
        info = registry_status(settings)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    console = Console()
    console.print(f"[bold]{info['model']}[/] at {info['tracking_uri']}")
    for alias in ("champion", "challenger"):
        v = info[alias]
        if v is None:
            console.print(f"  @{alias}: none")
        else:
            acc = "n/a" if v["test_accuracy"] is None else f"{v['test_accuracy']:.4f}"
            console.print(
                f"  @{alias}: v{v['version']}  test accuracy {acc}  "
                f"data {str(v['data_hash'])[:10]}  commit {str(v['git_commit'])[:10]}"
            )
    table = Table("time", "action", "from", "to", "reason", title="promotion ledger (newest first)")
    for e in info["ledger"]:
        table.add_row(e["time"], e["action"], e["from"] or "-", e["to"] or "-", e["reason"])
    console.print(table)


@app.command()
def promote(version: str) -> None:
    """Make VERSION the champion (recorded in the ledger)."""
    from pipeline.registry import configure_tracking, set_champion

    settings, _ = _context()
    with _registry_errors():
        configure_tracking(settings)
        set_champion(settings, version)
    typer.echo(f"{settings.model_name} v{version} is now @champion")


@app.command()
def rollback() -> None:
    """Make the previous champion the champion again (recorded in the ledger)."""
    from pipeline.registry import configure_tracking
    from pipeline.registry import rollback as registry_rollback

    settings, _ = _context()
    with _registry_errors():
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

    settings, _ = _context()
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        typer.echo(f"MLflow runs as a server already: open {uri}")
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
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def lineage(prediction_id: str) -> None:
    """Trace a prediction back to its model, run, commit and data."""
    raise _not_yet("lineage")


@app.command()
def reproduce(version: str) -> None:
    """Restore the data VERSION was trained on and retrain it."""
    raise _not_yet("reproduce")


if __name__ == "__main__":
    app()
