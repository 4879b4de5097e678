from __future__ import annotations

import pytest

from pipeline.ingest import ingest
from pipeline.preprocess import preprocess


@pytest.fixture
def prepared(settings, params):
    """The demo's digits bootstrap pool (a third of the set: quick to train on) ingested and
    preprocessed in the test's own project."""
    from pipeline.ingest import load_digits_frame

    pool = load_digits_frame("bootstrap", params.data.bootstrap_fraction, params.seed)
    report = ingest(
        "digits", settings.raw_dir, settings.quarantine_dir, params, keep=lambda _: pool
    )
    preprocess(settings.raw_dir / "dataset.parquet", settings.processed_dir, params)
    return report


@pytest.fixture
def full_digits(settings, params, tmp_path):
    """All 1,797 digits ingested and preprocessed (for the accuracy behaviour test)."""
    from pipeline.ingest import load_digits_frame

    source = tmp_path / "digits.csv"
    load_digits_frame("all").to_csv(source, index=False)
    report = ingest(str(source), settings.raw_dir, settings.quarantine_dir, params)
    preprocess(settings.raw_dir / "dataset.parquet", settings.processed_dir, params)
    return report
