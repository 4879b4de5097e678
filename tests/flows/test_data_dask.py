"""The streaming ingest and preprocess on a real Dask LocalCluster of 2 worker processes,
through Prefect's Dask task runner and a real (temporary) Prefect API: the same snapshot
byte for byte, every row in the same split, the preprocessor the single-process path fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import stages
from pipeline.config import Params
from pipeline.preprocess import PREPROCESSOR_FILE, SPLITS, split_path
from pipeline.validate import LABEL


def test_dask_parts_match_the_single_process_path(tmp_path, prefect_api):
    from flows.data import ingest_dask, preprocess_dask

    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(0, 5, (6_000, 12)), columns=[f"f{i}" for i in range(12)])
    frame.insert(0, LABEL, rng.integers(0, 10, len(frame)))
    frame.loc[[10, 2_500], "f3"] = np.nan
    source = tmp_path / "big.parquet"
    frame.to_parquet(source, index=False, row_group_size=2_000)  # 3 parts of 3 chunks
    params = Params.model_validate({"data": {"streaming_above_rows": 1_000, "chunk_rows": 900}})
    report = stages.ingest(str(source), tmp_path / "raw", tmp_path / "q", params)
    raw = Path(report.snapshot)

    on_dask = ingest_dask(str(source), tmp_path / "raw2", tmp_path / "q2", params, workers=2)
    assert on_dask.data_hash == report.data_hash  # the same snapshot, byte for byte
    assert on_dask.source_hash == report.source_hash
    assert on_dask.files == report.files and on_dask.rows_quarantined == 2
    assert (tmp_path / "q2" / "dataset.csv").read_text() == (
        tmp_path / "q" / "dataset.csv"
    ).read_text()

    here = stages.preprocess(raw, tmp_path / "here", params)
    there = preprocess_dask(raw, tmp_path / "dask", params, workers=2)

    assert here["streamed"]["parts"] == there["streamed"]["parts"] == 9
    assert here["rows"] == there["rows"] and sum(here["rows"].values()) == 5_998
    for split in SPLITS:
        a = sorted(p.name for p in split_path(tmp_path / "here", split).iterdir())
        b = sorted(p.name for p in split_path(tmp_path / "dask", split).iterdir())
        assert a == b and len(a) == 9
        pd.testing.assert_frame_equal(
            pd.read_parquet(split_path(tmp_path / "here", split)),
            pd.read_parquet(split_path(tmp_path / "dask", split)),
        )
    fitted = [json.loads((tmp_path / d / PREPROCESSOR_FILE).read_text()) for d in ("here", "dask")]
    assert fitted[0] == fitted[1]  # part statistics merged in part order: the same numbers
