"""Split and normalise. The fitted state is JSON (no pickle) and travels with the model,
so the server transforms a row exactly as training did."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.ingest import (
    file_md5,
    read_fixed_test,
    write_json_atomic,
    write_parquet_atomic,
)
from pipeline.validate import LABEL, Schema

log = logging.getLogger(__name__)

# The processed data directory: one Parquet file per split, the fitted preprocessor beside
# them, and report.json (split sizes, data hash). Every reader goes through the helpers below.
SPLITS = ("train", "val", "test")
PREPROCESSOR_FILE = "preprocessor.json"
REPORT_FILE = "report.json"
_MIN_SCALE = 1e-6


SCALINGS = ("image", "feature")


def choose_scaling(schema: Schema, preference: str = "auto") -> str:
    """ "image" (one mean and scale for every pixel) for image schemas, "feature" (each
    column its own) for tables; an explicit preference wins."""
    if preference != "auto":
        if preference not in SCALINGS:
            raise ValueError(f"unknown scaling {preference!r}: auto, image or feature")
        return preference
    return "image" if schema.image_side else "feature"


@dataclass
class Preprocessor:
    """Standardisation fitted on the training split only, and the ranges of the training
    data, so the server can tell rows the model has never seen the like of.

    Images are scaled by one global mean and standard deviation (the pixels keep their
    relative brightness; a border pixel that is almost always 0 does not get a huge scale),
    tables per feature. Either way the state is a mean and a scale per feature, so the
    transform, the JSON and the server do not depend on the choice."""

    schema: Schema
    mean: np.ndarray  # (F,) float32
    scale: np.ndarray  # (F,) float32
    low: np.ndarray | None = None  # (F,) float32: training minimum per feature
    high: np.ndarray | None = None  # (F,) float32: training maximum per feature
    row_peak: tuple[float, float] | None = None  # 0.5th and 99.5th percentile of max|row|
    scaling: str = "feature"  # "image" or "feature": how mean and scale were fitted

    @classmethod
    def fit(cls, features: np.ndarray, schema: Schema, scaling: str = "auto") -> Preprocessor:
        if features.ndim != 2 or features.shape[1] != schema.n_features:
            raise ValueError(f"expected (n, {schema.n_features}) features, got {features.shape}")
        scaling = choose_scaling(schema, scaling)
        if scaling == "image":
            mean = np.full(schema.n_features, features.mean(dtype=np.float64))
            std = np.full(schema.n_features, features.std(dtype=np.float64))
        else:
            mean = features.mean(axis=0, dtype=np.float64)
            std = features.std(axis=0, dtype=np.float64)
        scale = np.where(std < _MIN_SCALE, 1.0, std)  # constant features: leave unscaled
        peaks = np.abs(features).max(axis=1)
        return cls(
            schema,
            mean.astype(np.float32),
            scale.astype(np.float32),
            features.min(axis=0).astype(np.float32),
            features.max(axis=0).astype(np.float32),
            (float(np.percentile(peaks, 0.5)), float(np.percentile(peaks, 99.5))),
            scaling,
        )

    def out_of_range(self, features: np.ndarray) -> np.ndarray:
        """(n,) bool: rows unlike the training data. A feature beyond its training range by
        more than a quarter of that range, or a row whose largest value is a quarter of the
        smallest training rows' peak or four times the largest: the signs of other units
        (pixels in 0-1 sent to a model trained on 0-255) or of another kind of data."""
        features = np.asarray(features, dtype=np.float32)
        bounds = self._bounds
        if bounds is None:
            return np.zeros(len(features), dtype=bool)  # a state saved before ranges were kept
        lowest, highest, low_peak, high_peak = bounds
        beyond = ((features < lowest) | (features > highest)).any(axis=1)
        peak = np.abs(features).max(axis=1)
        return beyond | (peak < low_peak) | (peak > high_peak)

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """The limits `out_of_range` compares with, computed once (it runs per request)."""
        if self.low is None or self.high is None or self.row_peak is None:
            return None
        margin = (self.high - self.low) / 4
        low_peak, high_peak = self.row_peak
        return self.low - margin, self.high + margin, low_peak / 4, high_peak * 4

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(n, F) raw features -> (n, F) float32 standardised features."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.schema.n_features:
            raise ValueError(
                f"expected rows of {self.schema.n_features} features, got shape {features.shape}"
            )
        return (features - self.mean) / self.scale

    def to_dict(self) -> dict:
        state = {
            "kind": "standardize",
            "version": 2,
            "scaling": self.scaling,
            "schema": self.schema.to_dict(),
            # float32 -> Python float is exact, so the JSON round trip is lossless.
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
        }
        if self.low is not None and self.high is not None and self.row_peak is not None:
            state["low"] = [float(v) for v in self.low]
            state["high"] = [float(v) for v in self.high]
            state["row_peak"] = list(self.row_peak)
        return state

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessor:
        """Version 2 (with ranges) or 1 (before ranges: such a model flags no row)."""
        if data.get("kind") != "standardize" or data.get("version") not in (1, 2):
            raise ValueError(f"unknown preprocessor state: kind={data.get('kind')!r}")
        schema = Schema.from_dict(data["schema"])
        arrays = {
            k: np.asarray(data[k], dtype=np.float32)
            for k in ("mean", "scale", "low", "high")
            if k in data
        }
        if any(a.shape != (schema.n_features,) for a in arrays.values()):
            raise ValueError("preprocessor state does not match its schema")
        peak = data.get("row_peak")
        return cls(
            schema,
            arrays["mean"],
            arrays["scale"],
            arrays.get("low"),
            arrays.get("high"),
            (float(peak[0]), float(peak[1])) if peak else None,
            data.get("scaling", "feature"),  # states before the choice were per feature
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> Preprocessor:
        return cls.from_json(path.read_text())


def split_frame(
    frame: pd.DataFrame, val_size: float, test_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split, stratified on the label when every class allows it."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_size < 1 or not 0 < test_size < 1 or val_size + test_size >= 1:
        raise ValueError(f"bad split sizes: val={val_size}, test={test_size}")
    index = np.arange(len(frame))
    labels = frame[LABEL].to_numpy()
    if len(frame) < 3:
        raise ValueError(f"need at least 3 rows to split into train/val/test, got {len(frame)}")
    counts = np.bincount(labels)
    n_classes = int((counts > 0).sum())
    smallest_part = len(frame) * min(val_size, test_size)
    stratify = labels if counts[counts > 0].min() >= 3 and smallest_part >= n_classes else None
    if stratify is None:
        log.warning("too few rows per class to stratify: splitting without stratification")
    rest, test = train_test_split(index, test_size=test_size, stratify=stratify, random_state=seed)
    rest_labels = labels[rest] if stratify is not None else None
    train, val = train_test_split(
        rest, test_size=val_size / (1 - test_size), stratify=rest_labels, random_state=seed
    )
    return {
        name: frame.iloc[np.sort(idx)].reset_index(drop=True)
        for name, idx in zip(SPLITS, (train, val, test), strict=True)
    }


def _train_val(frame: pd.DataFrame, val_share: float, seed: int) -> dict[str, pd.DataFrame]:
    """Train and validation only (the test split is given), stratified when possible."""
    from sklearn.model_selection import train_test_split

    counts = frame[LABEL].value_counts()
    stratify = frame[LABEL] if len(counts) > 1 and counts.min() >= 2 else None
    train, val = train_test_split(
        np.arange(len(frame)), test_size=val_share, stratify=stratify, random_state=seed
    )
    return {
        "train": frame.iloc[np.sort(train)].reset_index(drop=True),
        "val": frame.iloc[np.sort(val)].reset_index(drop=True),
    }


def features_labels(frame: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """(n, F) float32 features and (n,) int64 labels of a validated frame."""
    features = frame.loc[:, list(schema.feature_names)].to_numpy(dtype=np.float32)
    return features, frame[LABEL].to_numpy(dtype=np.int64, copy=True)


def split_path(processed_dir: Path, split: str) -> Path:
    """data/processed/<split>.parquet"""
    return processed_dir / f"{split}.parquet"


def load_split(processed_dir: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(split_path(processed_dir, split))


def sample_split(processed_dir: Path, split: str, max_rows: int, seed: int) -> pd.DataFrame:
    """The split whole when it has at most `max_rows` rows, else a seeded sample of
    `max_rows` of them, read a row group at a time (a streamed split need not fit in
    memory): what a reference distribution needs, not every row."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(split_path(processed_dir, split), format="parquet")
    total = dataset.count_rows()
    if total <= max_rows:
        return dataset.to_table().to_pandas()
    keep = np.sort(np.random.default_rng(seed).choice(total, max_rows, replace=False))
    pieces, start = [], 0
    for batch in dataset.to_batches():
        end = start + batch.num_rows
        lo, hi = np.searchsorted(keep, [start, end])
        if hi > lo:
            pieces.append(batch.take(keep[lo:hi] - start).to_pandas())
        start = end
    return pd.concat(pieces, ignore_index=True)


def load_preprocessor(processed_dir: Path) -> Preprocessor:
    return Preprocessor.load(processed_dir / PREPROCESSOR_FILE)


def raw_test_set(processed_dir: Path, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """Raw (untransformed) test features and labels: what a client would send."""
    return features_labels(load_split(processed_dir, "test"), schema)


def preprocess(raw: Path, out_dir: Path, params: Params) -> dict:
    """Split the raw snapshot, fit the preprocessor on train, write splits + state + report.
    A snapshot with an official test split beside it (mnist) keeps that split as test.
    In memory; `pipeline.stages.preprocess` streams larger snapshots instead."""
    fixed = read_fixed_test(raw)
    digest = file_md5(raw)
    return preprocess_frames(pd.read_parquet(raw), out_dir, params, digest, fixed_test=fixed)


def preprocess_frames(
    base: pd.DataFrame,
    out_dir: Path,
    params: Params,
    data_hash: str,
    extra: pd.DataFrame | None = None,
    fixed_test: pd.DataFrame | None = None,
) -> dict:
    """Split `base` into train/val/test; `extra` rows (feedback) join train and val only, so
    the test split stays the same across data versions and rounds compare like with like.
    `fixed_test` (a source's official test split) is the test split as it is; `base` then
    only gives train and val.

    Cached by data hash: when out_dir already holds this data version's output made with the
    same split parameters, nothing is recomputed.
    """
    split = params.split
    key = cache_key(data_hash, params)
    cached = cached_report(out_dir, key)
    if cached is not None:
        log.info("preprocess: data version %s already processed (cached)", data_hash[:10])
        return cached
    schema = Schema(tuple(c for c in base.columns if c != LABEL), params.data.num_classes)
    if fixed_test is None:
        parts = split_frame(base, split.val_size, split.test_size, params.seed)
    else:
        parts = _train_val(base, split.val_size / (1 - split.test_size), params.seed)
        parts["test"] = fixed_test.loc[:, [LABEL, *schema.feature_names]].reset_index(drop=True)
    if extra is not None and len(extra):
        extra = extra.loc[:, [LABEL, *schema.feature_names]]
        val_share = split.val_size / (1 - split.test_size)
        picks = np.random.default_rng(params.seed).random(len(extra)) < val_share
        parts["train"] = pd.concat([parts["train"], extra[~picks]], ignore_index=True)
        parts["val"] = pd.concat([parts["val"], extra[picks]], ignore_index=True)
    train_x, _ = features_labels(parts["train"], schema)
    preprocessor = Preprocessor.fit(train_x, schema, params.preprocess.scaling)
    (out_dir / REPORT_FILE).unlink(missing_ok=True)  # no cache hit on half-replaced splits
    for name, part in parts.items():
        target = split_path(out_dir, name)
        if target.is_dir():  # parts of a streamed data version before this one
            shutil.rmtree(target)
        write_parquet_atomic(part, target)
    preprocessor.save(out_dir / PREPROCESSOR_FILE)
    report = {
        **key,
        "rows": {name: len(part) for name, part in parts.items()},
        "feedback_rows": 0 if extra is None else len(extra),
        "n_features": schema.n_features,
        "image_side": schema.image_side,
        "num_classes": schema.num_classes,
    }
    write_json_atomic(report, out_dir / REPORT_FILE)
    log.info(
        "preprocessed data %s: %s, image side %s", data_hash[:10], report["rows"], schema.image_side
    )
    return report


def cache_key(data_hash: str, params: Params, streamed: bool = False) -> dict:
    """What a processed directory was made from: it is reused only when all of it matches
    (a streamed output, split by hash into parts, is not the in-memory one)."""
    key = {
        "data_hash": data_hash,
        "seed": params.seed,
        "split": params.split.model_dump(),
        "scaling": params.preprocess.scaling,
        # the schema saved with the preprocessor carries it: a changed class count must
        # not reuse the old output (3-class data kept training 10-output models)
        "num_classes": params.data.num_classes,
    }
    return {**key, "split_by": "row position hash"} if streamed else key


def cached_report(out_dir: Path, key: dict) -> dict | None:
    path = out_dir / REPORT_FILE
    if not path.exists() or not all(split_path(out_dir, s).exists() for s in SPLITS):
        return None
    report = json.loads(path.read_text())
    return report if all(report.get(k) == v for k, v in key.items()) else None


def augment_batch(batch, max_shift: int, noise_std: float, generator=None):
    """Training-only augmentation of a (B, C, H, W) or (B, F) tensor.

    Each image is shifted by its own random offset of up to `max_shift` pixels, the uncovered
    border filled with that image's background (its smallest value, which after image
    scaling is the transformed 0, not the mean); every input gets Gaussian noise of
    `noise_std` (in standardised units). Never applied at evaluation or serving time.
    """
    import torch

    if batch.ndim == 4 and max_shift > 0:
        b, _, h, w = batch.shape
        s = max_shift
        background = batch.amin(dim=(1, 2, 3), keepdim=True)
        padded = background.expand(b, batch.shape[1], h + 2 * s, w + 2 * s).clone()
        padded[..., s : s + h, s : s + w] = batch
        offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator).to(batch.device)
        rows = (offsets[0][:, None] + torch.arange(h, device=batch.device))[:, :, None]
        cols = (offsets[1][:, None] + torch.arange(w, device=batch.device))[:, None, :]
        picked = padded.permute(0, 2, 3, 1)[
            torch.arange(b, device=batch.device)[:, None, None], rows, cols
        ]
        batch = picked.permute(0, 3, 1, 2).contiguous()
    if noise_std > 0:
        noise = torch.randn(batch.shape, generator=generator, device="cpu").to(batch.device)
        batch = batch + noise_std * noise
    return batch
