"""Data tests: each kind of bad input gets its documented outcome, and nothing is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ingest import DataFileError, file_md5, ingest, load_digits_frame

HEADER = "label," + ",".join(f"pixel{i}" for i in range(64))


def _row(label: object = 3, fill: object = 1.0, at: dict | None = None) -> str:
    values = [fill] * 64
    for index, value in (at or {}).items():
        values[index] = value
    return ",".join(map(str, [label, *values]))


def _csv(path: Path, rows: list[str], header: str = HEADER, newline: bool = True) -> Path:
    path.write_text("\n".join([header, *rows]) + ("\n" if newline else ""))
    return path


def _ingest(settings, params, source: Path):
    return ingest(str(source), settings.raw_dir, settings.quarantine_dir, params)


def _quarantine(settings) -> pd.DataFrame:
    return pd.read_csv(settings.quarantine_dir / "dataset.csv")


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        (_row(at={5: "nan"}), "missing pixel5"),
        (_row(at={7: ""}), "missing pixel7"),
        (_row(at={9: "inf"}), "non-finite pixel9"),
        (_row(at={2: "-inf"}), "non-finite pixel2"),
        (_row(at={4: "1e300"}), "non-finite pixel4"),
        (_row(at={11: "abc"}), "non-numeric pixel11"),
        (_row(label=10), "label outside 0..9"),
        (_row(label=-1), "label outside 0..9"),
        (_row(label=2.5), "label not an integer"),
        (_row(label="seven"), "label non-numeric"),
        (_row(label=""), "label missing"),
    ],
)
def test_bad_rows_are_quarantined_with_reason(settings, params, tmp_path, bad_row, reason):
    source = _csv(tmp_path / "in.csv", [_row(1), bad_row, _row(2)])
    report = _ingest(settings, params, source)

    assert (report.rows_in, report.rows_ok, report.rows_quarantined) == (3, 2, 1)
    kept = pd.read_parquet(settings.raw_dir / "dataset.parquet")
    assert kept["label"].tolist() == [1, 2]
    assert np.isfinite(kept.drop(columns="label").to_numpy()).all()
    quarantined = _quarantine(settings)
    assert quarantined["reason"].tolist() == [reason]
    assert quarantined["source"].tolist() == [str(source)]


def test_extra_column_is_reported_and_dropped(settings, params, tmp_path):
    source = tmp_path / "extra.csv"
    source.write_text(HEADER + ",comment\n" + _row(4) + ",hello\n")
    report = _ingest(settings, params, source)
    assert report.files[0]["extra_columns"] == ["comment"]
    kept = pd.read_parquet(settings.raw_dir / "dataset.parquet")
    assert "comment" not in kept.columns and len(kept) == 1


def test_missing_column_refuses_the_file(settings, params, tmp_path):
    header = "label," + ",".join(f"pixel{i}" for i in range(64) if i != 17)
    source = _csv(tmp_path / "gap.csv", [",".join(["1"] + ["0"] * 63)], header=header)
    with pytest.raises(DataFileError, match=r"gap\.csv: missing column\(s\) pixel17"):
        _ingest(settings, params, source)


def test_missing_label_column_refuses_the_file(settings, params, tmp_path):
    source = _csv(tmp_path / "nolabel.csv", ["1,2"], header="a,b")
    with pytest.raises(DataFileError, match="missing required column 'label'"):
        _ingest(settings, params, source)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"\n\n", "no header row"),
        (HEADER.encode() + b"\n", "a header but no data rows"),
        (
            (HEADER + "\n" + _row(1) + "\n" + _row(2)[:40]).encode(),
            "truncated: line 3 ends mid-row",
        ),
        (HEADER.encode() + b"\n" + _row(1).encode() + b"\n\xff\xfe\x00garbage\n", "not UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
    ],
)
def test_unreadable_file_stops_and_keeps_previous_version(
    settings, params, tmp_path, content, message
):
    good = _csv(tmp_path / "good.csv", [_row(1), _row(2)])
    _ingest(settings, params, good)
    snapshot = settings.raw_dir / "dataset.parquet"
    before = file_md5(snapshot)

    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(DataFileError, match=message) as err:
        _ingest(settings, params, bad)
    assert str(bad) in str(err.value)
    assert file_md5(snapshot) == before
    # nothing half-written beside the snapshot and its (here empty) official test split
    names = sorted(p.name for p in settings.raw_dir.iterdir())
    assert names == ["dataset.parquet", "dataset.test.parquet"]


def test_all_rows_bad_keeps_previous_version(settings, params, tmp_path):
    _ingest(settings, params, _csv(tmp_path / "good.csv", [_row(1)]))
    before = file_md5(settings.raw_dir / "dataset.parquet")
    with pytest.raises(DataFileError, match="no valid rows"):
        _ingest(settings, params, _csv(tmp_path / "bad.csv", [_row(label=99)]))
    assert file_md5(settings.raw_dir / "dataset.parquet") == before


def test_digits_parts_partition_the_set():
    boot = load_digits_frame("bootstrap", 0.35, seed=1)
    stream = load_digits_frame("stream", 0.35, seed=1)
    everything = load_digits_frame("all")
    assert list(everything.columns) == ["label"] + [f"pixel{i}" for i in range(64)]
    assert len(boot) + len(stream) == len(everything) == 1797  # scikit-learn's digits
    assert abs(len(boot) - 0.35 * len(everything)) < 1  # the share asked for, to the row
    assert set(boot["label"]) == set(range(10))

    def rows(frame: pd.DataFrame) -> np.ndarray:
        array = frame.to_numpy()
        return array[np.lexsort(array.T[::-1])]

    np.testing.assert_array_equal(rows(pd.concat([boot, stream])), rows(everything))


def test_other_columns_or_scale_do_not_replace_the_data_silently(settings, params, tmp_path):
    """783 pixels replacing 784, or 0-1 pixels replacing 0-255 ones, trains a different
    model on different data: refused with one line unless asked for, then recorded."""
    from pipeline.ingest import ingest, load_digits_frame

    digits = load_digits_frame("all").iloc[:300]
    first = tmp_path / "first.csv"
    digits.to_csv(first, index=False)
    ingest(str(first), settings.raw_dir, settings.quarantine_dir, params)
    before = file_md5(settings.raw_dir / "dataset.parquet")

    fewer = tmp_path / "fewer.csv"
    digits.drop(columns="pixel63").to_csv(fewer, index=False)
    scaled = tmp_path / "scaled.csv"
    digits.assign(**{c: digits[c] / 16 for c in digits.columns if c != "label"}).to_csv(
        scaled, index=False
    )
    # a larger image whose border pixels (the current data's columns) are all 0: not taken
    # for the current features plus extra columns (that would keep 64 blank pixels)
    larger = tmp_path / "larger.csv"
    frame = pd.DataFrame(0.0, index=digits.index, columns=[f"pixel{i}" for i in range(100)])
    frame[[f"pixel{i}" for i in range(64, 100)]] = 5.0
    frame.insert(0, "label", digits["label"])
    frame.to_csv(larger, index=False)
    for path, message in (
        (larger, "100 feature columns where the current data has 64"),
        (fewer, "63 feature columns where the current data has 64 (missing pixel63; new none)"),
        (scaled, "values up to 1 where the current data goes up to 16"),
    ):
        with pytest.raises(DataFileError, match=r"--allow-schema-change") as err:
            ingest(str(path), settings.raw_dir, settings.quarantine_dir, params)
        assert message in str(err.value)
        assert file_md5(settings.raw_dir / "dataset.parquet") == before

    report = ingest(
        str(scaled), settings.raw_dir, settings.quarantine_dir, params, allow_schema_change=True
    )
    assert "values up to 1" in report.schema_change
    assert file_md5(settings.raw_dir / "dataset.parquet") != before
    same = ingest(str(scaled), settings.raw_dir, settings.quarantine_dir, params)
    assert same.schema_change == ""


def _table(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    """A user's own table, not pixels: text ids, 5 features on their own scales, 3 classes."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        rng.normal(size=(rows, 5)) * [1, 10, 100, 0.1, 5], columns=[f"f{i}" for i in range(5)]
    )
    frame.insert(0, "id", [f"row-{k}" for k in range(rows)])
    frame["label"] = rng.integers(0, 3, rows)
    return frame


@pytest.mark.parametrize("streamed", [False, True])
def test_a_tables_id_column_is_dropped_and_a_later_extra_column_too(
    settings, params, tmp_path, streamed
):
    """A table with an `id` column of text ingests (the column is reported and dropped,
    not a feature whose every cell is non-numeric); a later file with one more column
    than the current data keeps the current features (the new one is reported and
    dropped, as the guide says), unless a change of schema is asked for."""
    from pipeline import stages

    if streamed:
        params = params.updated(data={"streaming_above_rows": 100, "chunk_rows": 128})
    run = stages.ingest if streamed else ingest

    def go(path: Path, **kw):
        return run(str(path), settings.raw_dir, settings.quarantine_dir, params, **kw)

    frame = _table()
    first = tmp_path / "first.csv"
    frame.to_csv(first, index=False)
    report = go(first)
    assert (report.rows_ok, report.rows_quarantined) == (300, 0)
    assert report.files[0]["extra_columns"] == ["id"]
    kept = pd.read_parquet(settings.raw_dir / "dataset.parquet")
    assert list(kept.columns) == ["label", "f0", "f1", "f2", "f3", "f4"]

    wider = tmp_path / "wider.csv"
    frame.assign(note=1.5).to_csv(wider, index=False)
    report = go(wider)
    assert report.files[0]["extra_columns"] == ["id", "note"] and report.schema_change == ""
    assert list(pd.read_parquet(settings.raw_dir / "dataset.parquet").columns) == list(kept.columns)
    report = go(wider, allow_schema_change=True)
    assert "6 feature columns where the current data has 5" in report.schema_change
    assert "note" in pd.read_parquet(settings.raw_dir / "dataset.parquet").columns


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refused_file_says_which_column_and_what_to_do(settings, params, tmp_path, streamed):
    """Every row bad: the error names the column at fault, and says what to do where it is
    plain: a text column taken for a feature, class names for labels."""
    from pipeline import stages

    if streamed:
        params = params.updated(data={"streaming_above_rows": 100, "chunk_rows": 128})
    run = stages.ingest if streamed else ingest
    frame = _table().rename(columns={"id": "name"})
    named = tmp_path / "named.csv"
    frame.to_csv(named, index=False)
    with pytest.raises(DataFileError) as err:
        run(str(named), settings.raw_dir, settings.quarantine_dir, params)
    text = str(err.value)
    assert "all 300 rows quarantined, non-numeric: 300 (non-numeric name: 300)" in text
    assert "column 'name' is not numeric in any row" in text

    animals = tmp_path / "animals.csv"
    frame = _table()
    frame["label"] = np.array(["cat", "dog", "bird"])[frame["label"]]
    frame.to_csv(animals, index=False)
    with pytest.raises(DataFileError) as err:
        run(str(animals), settings.raw_dir, settings.quarantine_dir, params)
    assert "label non-numeric: 300" in str(err.value)
    assert "labels must be class numbers 0..num_classes-1" in str(err.value)
    assert not (settings.raw_dir / "dataset.parquet").exists()
