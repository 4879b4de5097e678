"""Hostile inputs at ingest: path names, symbolic links, spreadsheet formulas."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pipeline.ingest import DataFileError, ingest, neutralise_formulas

HEADER = "label," + ",".join(f"pixel{i}" for i in range(64))


def _row(label: int, value: float = 1.0) -> str:
    return f"{label}," + ",".join([str(value)] * 64)


def _csv(path, rows):
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/abs", "a/b", "..", ".hidden"])
def test_a_snapshot_name_cannot_leave_data_raw(settings, params, tmp_path, name):
    source = _csv(tmp_path / "ok.csv", [_row(1), _row(2)])
    with pytest.raises(DataFileError, match="a name, not a path"):
        ingest(str(source), settings.raw_dir, settings.quarantine_dir, params, name=name)
    assert not (tmp_path / "escaped.parquet").exists()
    assert not list(settings.root.parent.rglob("escaped*"))


def test_a_link_to_a_file_outside_is_refused_and_never_echoed(settings, params, tmp_path):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\nsecret-line\n")
    drop = tmp_path / "drop"
    drop.mkdir()
    _csv(drop / "good.csv", [_row(1), _row(2)])
    os.symlink(secret, drop / "data.csv")
    for source in (drop, drop / "data.csv"):
        with pytest.raises(DataFileError, match="symbolic link to a file outside") as err:
            ingest(str(source), settings.raw_dir, settings.quarantine_dir, params)
        assert "root:x" not in str(err.value) and "secret-line" not in str(err.value)
    # a link inside its own folder is an ordinary file
    os.remove(drop / "data.csv")
    os.symlink(drop / "good.csv", drop / "alias.csv")
    report = ingest(str(drop / "alias.csv"), settings.raw_dir, settings.quarantine_dir, params)
    assert report.rows_ok == 2


def test_a_header_that_is_not_one_is_not_echoed(settings, params, tmp_path):
    """A system file passed directly: the schema error names no part of its first line."""
    odd = tmp_path / "odd.csv"
    odd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1\n")
    with pytest.raises(DataFileError) as err:
        ingest(str(odd), settings.raw_dir, settings.quarantine_dir, params)
    assert "root:x" not in str(err.value) and "/bin/bash" not in str(err.value)
    assert "not shown" in str(err.value)


def test_quarantined_formula_cells_are_neutralised(settings, params, tmp_path):
    source = _csv(
        tmp_path / "mixed.csv",
        [_row(1), "=cmd|' /C calc'!A0," + ",".join(["1"] * 64), "3," + ",".join(["@SUM(A1)"] * 64)],
    )
    ingest(str(source), settings.raw_dir, settings.quarantine_dir, params)
    text = (settings.quarantine_dir / "dataset.csv").read_text()
    assert "'=cmd|" in text and "'@SUM(A1)" in text
    assert ",=cmd" not in text and "\n=cmd" not in text and ",@SUM" not in text
    frame = pd.DataFrame({"a": ["-1.5", "-x", "+3", "=1+1", "ok"], "b": [1, 2, 3, 4, 5]})
    safe = neutralise_formulas(frame)
    assert safe["a"].tolist() == ["-1.5", "'-x", "+3", "'=1+1", "ok"]
    assert safe["b"].tolist() == [1, 2, 3, 4, 5]


def test_width_and_declared_size_are_checked_before_reading(settings, params, tmp_path):
    """A million-column CSV and a small Parquet file declaring far more rows than the limit
    allows are refused from their header and metadata, in one line, before any parse."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.ingest import MAX_INGEST_COLUMNS

    wide = tmp_path / "wide.csv"
    with wide.open("w") as fh:
        fh.write("label," + ",".join(f"c{i}" for i in range(MAX_INGEST_COLUMNS + 5)) + "\n")
        fh.write("1" + ",0" * (MAX_INGEST_COLUMNS + 5) + "\n")
    with pytest.raises(DataFileError, match=r"columns, over the limit of 100,000"):
        ingest(str(wide), settings.raw_dir, settings.quarantine_dir, params)

    bomb = tmp_path / "bomb.parquet"
    rows = 2_000_000
    table = pa.table({"label": np.zeros(rows, np.int8), "pixel0": np.zeros(rows, np.int8)})
    pq.write_table(table, bomb, compression="zstd")
    assert bomb.stat().st_size < 200_000  # small on disk ...
    with pytest.raises(DataFileError, match=r"declares 2,000,000 rows x 2 columns"):
        ingest(  # ... 32 MB once decoded: over twice a 10 MB limit
            str(bomb), settings.raw_dir, settings.quarantine_dir, params, max_bytes=10_000_000
        )
