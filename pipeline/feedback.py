"""Feedback -> data source: labelled predictions come back as a new DVC-versioned data version.

The loop's data lives in one DVC-tracked directory, `data/loop/`:

    bootstrap.parquet      the initial pool (from the source: digits, a file, a directory)
    feedback.parquet       labelled predictions pulled from the prediction log (id, label, features)
    feedback_state.json    the watermark of the last pull

Only rows with a ground-truth label come back (never the model's own prediction); rows are
de-duplicated by prediction id (a re-labelled id keeps its newest label); the watermark
makes a second pull add nothing; a lock makes two concurrent pulls safe.

Training never sees one example twice: `training_frames` also drops feedback rows whose
features equal a bootstrap row or a newer feedback row (a content hash of the feature
values), so the same image sent again under a new id adds nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from pipeline.ingest import write_atomic, write_json_atomic, write_parquet_atomic
from pipeline.store import PredictionStore
from pipeline.validate import LABEL, Schema, validate_frame

log = logging.getLogger(__name__)

BOOTSTRAP, FEEDBACK, STATE = "bootstrap.parquet", "feedback.parquet", "feedback_state.json"
SOURCE = "source.json"  # where the bootstrap pool came from: {"source", "source_hash"}
ID = "id"


@dataclass
class PullReport:
    pulled: int  # labelled rows read from the log since the watermark
    new: int  # rows added or re-labelled in feedback.parquet
    quarantined: int
    total_feedback: int
    watermark: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_state(loop_dir: Path) -> dict:
    path = loop_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {"watermark": 0.0, "pulls": 0}


def read_source(loop_dir: Path) -> dict:
    """The source the bootstrap pool was ingested from (part of the data version)."""
    path = loop_dir / SOURCE
    return json.loads(path.read_text()) if path.exists() else {"source": "", "source_hash": ""}


def read_feedback(loop_dir: Path) -> pd.DataFrame | None:
    path = loop_dir / FEEDBACK
    return pd.read_parquet(path) if path.exists() else None


def pull_feedback(
    store: PredictionStore, loop_dir: Path, schema: Schema, quarantine_dir: Path
) -> PullReport:
    """Append the labelled predictions logged since the last pull to feedback.parquet."""
    loop_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(loop_dir.parent / ".loop.lock"), timeout=300):
        state = read_state(loop_dir)
        # >= and de-duplication by id: rows sharing the watermark's timestamp are not missed.
        rows = store.labelled_since(state["watermark"] - 1e-6)
        existing = read_feedback(loop_dir)
        if not rows:
            total = 0 if existing is None else len(existing)
            return PullReport(0, 0, 0, total, state["watermark"])
        frame = _rows_to_frame(rows, schema)
        result = validate_frame(frame.drop(columns=[ID]), schema, "prediction log")
        valid_ids = frame.loc[~frame.index.isin(result.quarantine.index), ID]
        clean = result.clean
        clean.insert(0, ID, valid_ids.to_numpy())
        if len(result.quarantine):
            bad = result.quarantine.assign(**{ID: frame.loc[result.quarantine.index, ID]})
            write_atomic(quarantine_dir / "feedback.csv", lambda p: bad.to_csv(p, index=False))
        merged, new = _merge(existing, clean)
        watermark = max(r["labelled_at"] for r in rows)
        if new:
            write_parquet_atomic(merged, loop_dir / FEEDBACK)
        write_json_atomic(
            {"watermark": watermark, "pulls": state["pulls"] + 1, "pulled_at": time.time()},
            loop_dir / STATE,
        )
    report = PullReport(len(rows), new, len(result.quarantine), len(merged), watermark)
    log.info(
        "feedback pull: %d labelled rows read, %d new, %d in all",
        report.pulled,
        report.new,
        report.total_feedback,
    )
    return report


def _rows_to_frame(rows: list[dict], schema: Schema) -> pd.DataFrame:
    features = np.asarray([r["features"] for r in rows], dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != schema.n_features:
        raise ValueError(
            f"logged rows have {features.shape[-1]} features, the dataset "
            f"{schema.n_features}: a model with another schema served them"
        )
    frame = pd.DataFrame(features, columns=list(schema.feature_names))
    frame.insert(0, LABEL, [r["true_label"] for r in rows])
    frame.insert(0, ID, [r["id"] for r in rows])
    return frame


def _merge(existing: pd.DataFrame | None, pulled: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Union by id, newest label wins; returns (merged, rows added or changed)."""
    if existing is None or existing.empty:
        return pulled.reset_index(drop=True), len(pulled)
    old = existing.set_index(ID)
    incoming = pulled.set_index(ID)
    common = incoming.index.intersection(old.index)
    changed = int((old.loc[common, LABEL] != incoming.loc[common, LABEL]).sum())
    added = len(incoming.index.difference(old.index))
    merged = pd.concat([old.drop(index=common), incoming]).reset_index()
    return merged, added + changed


def training_frames(loop_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(bootstrap, feedback without ids) of the current data version, each example once."""
    bootstrap = pd.read_parquet(loop_dir / BOOTSTRAP)
    feedback = read_feedback(loop_dir)
    if feedback is None:
        return bootstrap, None
    feedback = feedback.drop(columns=[ID])
    features = [c for c in bootstrap.columns if c != LABEL]
    seen = set(content_hashes(bootstrap, features))
    hashes = content_hashes(feedback, features)
    # newest label wins among repeats within the feedback: keep each hash's last row
    last = ~pd.Series(hashes).duplicated(keep="last").to_numpy()
    fresh = last & ~np.isin(hashes, list(seen))
    if not fresh.all():
        log.info("%d feedback rows repeat an example already in the data", int((~fresh).sum()))
    return bootstrap, feedback.loc[fresh].reset_index(drop=True)


def content_hashes(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    """One 64-bit hash per row of its feature values (as float32, the model's view)."""
    values = frame.loc[:, features].astype(np.float32)
    return pd.util.hash_pandas_object(values, index=False).to_numpy()
