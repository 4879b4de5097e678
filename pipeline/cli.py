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
    from pipeline.ingest import DataFileError, write_json_atomic
    from pipeline.ingest import ingest as run_ingest

    settings, params = _context()
    source = source or params["data"]["source"]
    try:
        report = run_ingest(source, settings.raw_dir, settings.quarantine_dir, params, name=name)
    except DataFileError as exc:
        raise _fail(str(exc)) from exc
    write_json_atomic(report.to_dict(), settings.reports_dir / "ingest.json")
    typer.echo(
        f"{report.rows_ok} rows -> {report.snapshot} ({report.rows_quarantined} quarantined), "
        f"md5 {report.data_hash}"
    )


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


@app.command()
def run(
    rounds: Annotated[int, typer.Option(min=1)] = 2,
    source: Annotated[str | None, typer.Option(help="digits or a CSV/Parquet path")] = None,
    trials: Annotated[int | None, typer.Option(min=1)] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run the whole loop for N rounds and print one summary row per round."""
    from pipeline.ingest import DataFileError, write_json_atomic
    from pipeline.ingest import ingest as run_ingest
    from pipeline.preprocess import preprocess as run_preprocess

    settings, params = _context()
    source = source or params["data"]["source"]
    try:
        report = run_ingest(source, settings.raw_dir, settings.quarantine_dir, params)
    except DataFileError as exc:
        raise _fail(str(exc)) from exc
    write_json_atomic(report.to_dict(), settings.reports_dir / "ingest.json")
    split = run_preprocess(Path(report.snapshot), settings.processed_dir, params)
    typer.echo(f"data version {report.data_hash[:10]}: {split['rows']}")


@app.command()
def serve() -> None:
    """Start the prediction server."""
    raise _not_yet("serve")


@app.command()
def schedule() -> None:
    """Serve the Prefect deployments (scheduled retraining, monitor)."""
    raise _not_yet("schedule")


@app.command()
def status() -> None:
    """Champion, challenger and the recent promotion ledger."""
    raise _not_yet("status")


@app.command()
def rollback() -> None:
    """Make the previous champion the champion again."""
    raise _not_yet("rollback")


@app.command()
def ui() -> None:
    """Start the MLflow UI on the project's store."""
    raise _not_yet("ui")


@app.command()
def promote(version: str) -> None:
    """Make VERSION the champion."""
    raise _not_yet("promote")


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
