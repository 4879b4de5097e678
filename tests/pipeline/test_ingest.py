"""Ingest: sources, the pixel-CSV layout, atomic snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ingest import file_md5, ingest, write_atomic
from pipeline.preprocess import preprocess


def _mnist_like(path: Path, rows: int, seed: int = 0) -> Path:
    """A small synthetic file in the Kaggle MNIST layout: label, pixel0..pixel783."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        rng.integers(0, 256, size=(rows, 784)), columns=[f"pixel{i}" for i in range(784)]
    )
    frame.insert(0, "label", np.arange(rows) % 10)
    frame.to_csv(path, index=False)
    return path


def test_kaggle_mnist_layout_is_a_28x28_image(settings, params, tmp_path):
    report = ingest(
        str(_mnist_like(tmp_path / "train.csv", 60)),
        settings.raw_dir,
        settings.quarantine_dir,
        params,
    )
    assert report.rows_ok == 60
    assert len(report.schema["feature_names"]) == 784
    split = preprocess(Path(report.snapshot), settings.processed_dir, params)
    assert split["image_side"] == 28 and split["n_features"] == 784


def test_non_square_features_are_not_an_image(settings, params, tmp_path):
    source = tmp_path / "tabular.csv"
    frame = pd.DataFrame({"a": np.arange(30.0), "b": 1.0, "c": 2.0, "label": np.arange(30) % 3})
    frame.to_csv(source, index=False)
    report = ingest(str(source), settings.raw_dir, settings.quarantine_dir, params)
    assert report.schema["feature_names"] == ["a", "b", "c"]
    split = preprocess(Path(report.snapshot), settings.processed_dir, params)
    assert split["image_side"] is None


def test_directory_of_csv_and_parquet(settings, params, tmp_path):
    from pipeline.ingest import load_digits_frame

    digits = load_digits_frame("all")
    folder = tmp_path / "incoming"
    folder.mkdir()
    digits.iloc[:100].to_csv(folder / "a.csv", index=False)
    digits.iloc[100:250].to_parquet(folder / "b.parquet")
    (folder / "notes.txt").write_text("ignored: not a table")
    report = ingest(str(folder), settings.raw_dir, settings.quarantine_dir, params)
    assert report.rows_ok == 250 and len(report.files) == 2
    kept = pd.read_parquet(report.snapshot)
    np.testing.assert_array_equal(kept.to_numpy(), digits.iloc[:250].to_numpy())


def test_directory_files_must_share_one_schema(settings, params, tmp_path):
    from pipeline.ingest import DataFileError, load_digits_frame

    folder = tmp_path / "incoming"
    folder.mkdir()
    digits = load_digits_frame("all")
    digits.iloc[:10].to_csv(folder / "a.csv", index=False)
    digits.iloc[:10].drop(columns="pixel3").to_csv(folder / "b.csv", index=False)
    with pytest.raises(DataFileError, match=r"b\.csv: missing column\(s\) pixel3"):
        ingest(str(folder), settings.raw_dir, settings.quarantine_dir, params)
    assert not (settings.raw_dir / "dataset.parquet").exists()


def test_snapshot_is_deterministic(settings, params):
    first = ingest("digits", settings.raw_dir, settings.quarantine_dir, params).data_hash
    second = ingest("digits", settings.raw_dir, settings.quarantine_dir, params).data_hash
    assert first == second == file_md5(settings.raw_dir / "dataset.parquet")


def test_crash_while_writing_leaves_previous_file(tmp_path):
    target = tmp_path / "snap.parquet"
    target.write_bytes(b"version 1")

    def crash(path: Path) -> None:
        path.write_bytes(b"half of version 2")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        write_atomic(target, crash)
    assert target.read_bytes() == b"version 1"
    assert [p.name for p in tmp_path.iterdir()] == ["snap.parquet"]


def test_atomic_writes_get_the_ordinary_file_mode(tmp_path):
    """Not mkstemp's 0600: DVC, other users and containers read the data outputs."""
    import os

    mask = os.umask(0o022)
    try:
        target = tmp_path / "out.json"
        write_atomic(target, lambda p: p.write_text("{}"))
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_compressed_sources_are_read_directly(settings, params, tmp_path):
    """A gzipped CSV, and a zip holding one CSV, ingest like the plain CSV they hold."""
    import gzip
    import zipfile

    from pipeline.ingest import DataFileError, load_digits_frame

    digits = load_digits_frame("all").iloc[:200]
    text = digits.to_csv(index=False).encode()
    gz = tmp_path / "digits.csv.gz"
    gz.write_bytes(gzip.compress(text))
    zipped = tmp_path / "digits.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("folder/digits.csv", text)
        archive.writestr("__MACOSX/folder/._digits.csv", b"junk")
    plain = tmp_path / "digits.csv"
    plain.write_bytes(text)
    reports = [
        ingest(str(p), settings.raw_dir, settings.quarantine_dir, params, name=f"copy{k}")
        for k, p in enumerate((plain, gz, zipped))
    ]
    assert {r.rows_ok for r in reports} == {200}
    assert len({r.source_hash for r in reports}) == 1  # the same contents, whatever the wrapping

    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a.csv", text)
        archive.writestr("b.csv", text)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(text)[:-20])
    bomb = tmp_path / "bomb.csv.gz"
    bomb.write_bytes(gzip.compress(b"label,pixel0\n" + b"1,0\n" * 200_000))
    for path, message, limit in (
        (two, "exactly one .csv file, it holds 2", None),
        (cut, "not a readable csv.gz file", None),
        (bomb, "once decompressed", 100_000),
    ):
        kwargs = {"max_bytes": limit} if limit else {}
        with pytest.raises(DataFileError, match=message) as err:
            ingest(
                str(path), settings.raw_dir, settings.quarantine_dir, params, name="bad", **kwargs
            )
        assert str(path) in str(err.value)


def test_check_source_finds_what_ingest_refuses_and_reads_only_small_sources(tmp_path, monkeypatch):
    from pipeline import ingest as ingest_module
    from pipeline.ingest import DataFileError, check_source

    check_source("digits")  # built in: nothing to look at
    with pytest.raises(DataFileError, match="no such file or directory"):
        check_source(str(tmp_path / "missing.csv"))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DataFileError, match="holds no .csv or .parquet"):
        check_source(str(tmp_path / "empty-dir"))
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"label,pixel0,pixel1\n1,0,0\n2,0")
    with pytest.raises(DataFileError, match="truncated"):
        check_source(str(cut))
    good = tmp_path / "good.csv"
    good.write_bytes(b"label,pixel0,pixel1\n1,0,0\n2,0,1\n")
    check_source(str(good))
    # over CHECK_BYTES the files are left to the flow, which reads them once
    monkeypatch.setattr(ingest_module, "CHECK_BYTES", cut.stat().st_size - 1)
    check_source(str(cut))
