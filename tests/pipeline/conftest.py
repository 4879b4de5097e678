from __future__ import annotations

import pytest

from pipeline.ingest import ingest
from pipeline.preprocess import preprocess


@pytest.fixture
def prepared(settings, params):
    """The digits bootstrap pool ingested and preprocessed in the test's own project."""
    report = ingest("digits", settings.raw_dir, settings.quarantine_dir, params)
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
