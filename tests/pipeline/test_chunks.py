"""The streaming data stages (pipeline/chunks.py) against the in-memory ones on the same
data: a source several chunks long, with bad rows spread across chunk boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import stages
from pipeline.chunks import Moments, split_of
from pipeline.config import Params
from pipeline.ingest import ingest as ingest_in_memory
from pipeline.preprocess import SPLITS, Preprocessor, load_preprocessor, split_path
from pipeline.validate import LABEL, Schema

FEATURES = [f"pixel{i}" for i in range(16)]


def _params(**data) -> Params:
    base = {"streaming_above_rows": 1_000, "chunk_rows": 700, **data}
    return Params.model_validate({"data": base})


def _source(path: Path, rows: int = 5_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.integers(0, 17, (rows, 16)).astype(np.float64), columns=FEATURES)
    frame.insert(0, LABEL, rng.integers(0, 10, rows))
    bad = [i for i in (3, 699, 700, 2_101, 1_400, rows - 1) if i < rows]
    frame.loc[bad[:4], "pixel5"] = np.nan  # missing, at chunk edges too
    frame.loc[bad[4:], LABEL] = 12  # a label outside the classes
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return frame


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_the_streamed_ingest_keeps_and_quarantines_what_the_in_memory_one_does(tmp_path, suffix):
    source = tmp_path / f"source{suffix}"
    _source(source)
    params = _params()
    streamed = stages.ingest(str(source), tmp_path / "a", tmp_path / "qa", params)
    whole = ingest_in_memory(str(source), tmp_path / "b", tmp_path / "qb", params)

    import pyarrow.parquet as pq

    assert pq.ParquetFile(streamed.snapshot).metadata.num_row_groups == 8  # one per chunk
    pd.testing.assert_frame_equal(
        pd.read_parquet(streamed.snapshot), pd.read_parquet(whole.snapshot)
    )
    bad_a = pd.read_csv(tmp_path / "qa" / "dataset.csv")
    bad_b = pd.read_csv(tmp_path / "qb" / "dataset.csv")
    assert list(bad_a["reason"]) == list(bad_b["reason"]) and len(bad_a) == 6
    assert (streamed.rows_in, streamed.rows_ok, streamed.rows_quarantined) == (5_000, 4_994, 6)
    assert streamed.files[0]["reasons"] == whole.files[0]["reasons"]
    assert streamed.source_hash == whole.source_hash  # the same data hashes the same
    assert pd.read_parquet(Path(streamed.snapshot).with_name("dataset.test.parquet")).empty


def test_a_refused_streamed_source_leaves_the_current_snapshot_as_it_was(tmp_path):
    first = tmp_path / "first.parquet"
    _source(first)
    params = _params()
    report = stages.ingest(str(first), tmp_path / "raw", tmp_path / "q", params)
    before = Path(report.snapshot).read_bytes()
    scaled = _source(tmp_path / "scaled.parquet")
    scaled[FEATURES] = scaled[FEATURES] / 16 / 255  # another unit: refused
    scaled.to_parquet(tmp_path / "scaled.parquet", index=False)
    from pipeline.ingest import DataFileError

    with pytest.raises(DataFileError, match="allow-schema-change"):
        stages.ingest(str(tmp_path / "scaled.parquet"), tmp_path / "raw", tmp_path / "q", params)
    assert Path(report.snapshot).read_bytes() == before
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("scaling", ["feature", "image"])
def test_moments_merged_chunk_by_chunk_fit_the_one_pass_preprocessor(scaling):
    rng = np.random.default_rng(1)
    x = (rng.normal(3, 2, (10_007, 16)) * rng.uniform(0.1, 50, 16)).astype(np.float32)
    schema = Schema(tuple(FEATURES), 10)
    keep = Moments.keep_for(len(x))
    merged = None
    for part in np.array_split(x, [5, 700, 701, 4_000, 9_999]):  # uneven, one of 1 row
        m = Moments.of(part, keep)
        merged = m if merged is None else merged.merge(m, keep)
    got = merged.preprocessor(schema, scaling)
    want = Preprocessor.fit(x, schema, scaling)
    np.testing.assert_allclose(got.mean, want.mean, rtol=2e-7)
    np.testing.assert_allclose(got.scale, want.scale, rtol=2e-7)
    np.testing.assert_array_equal(got.low, want.low)
    np.testing.assert_array_equal(got.high, want.high)
    assert got.row_peak == want.row_peak  # exactly


def test_a_rows_split_depends_on_its_position_and_the_seed_only():
    positions = np.arange(200_000)
    whole = split_of(positions, 42, 0.15, 0.2)
    pieces = np.concatenate([split_of(p, 42, 0.15, 0.2) for p in np.array_split(positions, 7)])
    np.testing.assert_array_equal(whole, pieces)
    for code, share in ((0, 0.65), (1, 0.15), (2, 0.2)):
        sd = np.sqrt(share * (1 - share) / len(positions))
        assert abs((whole == code).mean() - share) < 4 * sd
    assert (split_of(positions, 43, 0.15, 0.2) != whole).mean() > 0.3  # another seed, another split


def test_the_streamed_preprocess_writes_parts_and_fits_on_the_training_rows(tmp_path):
    source = tmp_path / "source.parquet"
    _source(source)
    params = _params()
    report = stages.ingest(str(source), tmp_path / "raw", tmp_path / "q", params)
    out = tmp_path / "processed"
    result = stages.preprocess(Path(report.snapshot), out, params)
    parts = {s: pd.read_parquet(split_path(out, s)) for s in SPLITS}
    assert {s: len(p) for s, p in parts.items()} == result["rows"]
    assert sum(result["rows"].values()) == 4_994
    assert len(list(split_path(out, "train").glob("part-*.parquet"))) == 8
    everything = pd.concat(parts.values()).sort_values([LABEL, *FEATURES], ignore_index=True)
    snapshot = pd.read_parquet(report.snapshot).sort_values([LABEL, *FEATURES], ignore_index=True)
    pd.testing.assert_frame_equal(everything, snapshot)  # every row in exactly one split
    schema = Schema(tuple(FEATURES), 10)
    fitted = load_preprocessor(out)
    want = Preprocessor.fit(parts["train"][FEATURES].to_numpy(np.float32), schema)
    np.testing.assert_allclose(fitted.mean, want.mean, rtol=2e-7)
    np.testing.assert_allclose(fitted.scale, want.scale, rtol=2e-7)
    assert fitted.row_peak == want.row_peak
    # the same data version again: cached, nothing rewritten
    stamp = (out / "report.json").stat().st_mtime_ns
    assert stages.preprocess(Path(report.snapshot), out, params) == result
    assert (out / "report.json").stat().st_mtime_ns == stamp


def test_small_sources_keep_the_in_memory_stratified_path(tmp_path):
    source = tmp_path / "source.parquet"
    _source(source, rows=900)
    params = _params()
    report = stages.ingest(str(source), tmp_path / "raw", tmp_path / "q", params)
    result = stages.preprocess(Path(report.snapshot), tmp_path / "processed", params)
    assert "streamed" not in result and split_path(tmp_path / "processed", "train").is_file()


def test_a_small_version_after_a_streamed_one_replaces_its_parts(tmp_path):
    """Streamed, then in memory, into the same processed directory: files replace the
    directories of parts, and nothing of the streamed version is read back."""
    params = _params()
    big = tmp_path / "big.parquet"
    _source(big)
    raw = stages.ingest(str(big), tmp_path / "raw", tmp_path / "q", params).snapshot
    out = tmp_path / "processed"
    stages.preprocess(Path(raw), out, params)
    assert split_path(out, "train").is_dir()
    small = tmp_path / "small.parquet"
    _source(small, rows=900, seed=5)
    raw = stages.ingest(str(small), tmp_path / "raw", tmp_path / "q", params).snapshot
    result = stages.preprocess(Path(raw), out, params)
    assert split_path(out, "train").is_file()
    assert sum(len(pd.read_parquet(split_path(out, s))) for s in SPLITS) == 896
    assert sum(result["rows"].values()) == 896


def test_the_drift_reference_is_a_seeded_sample_of_a_large_split(tmp_path):
    from pipeline.preprocess import sample_split

    source = tmp_path / "source.parquet"
    _source(source)
    params = _params()
    raw = stages.ingest(str(source), tmp_path / "raw", tmp_path / "q", params).snapshot
    out = tmp_path / "processed"
    result = stages.preprocess(Path(raw), out, params)
    train = pd.read_parquet(split_path(out, "train"))
    sample = sample_split(out, "train", 500, seed=1)
    assert len(sample) == 500 and result["streamed"]
    assert sample.merge(train, how="left", indicator=True)["_merge"].eq("both").all()
    pd.testing.assert_frame_equal(sample, sample_split(out, "train", 500, seed=1))
    assert not sample.equals(sample_split(out, "train", 500, seed=2))
    assert len(sample_split(out, "train", 10**6, seed=1)) == len(train)  # small: whole
