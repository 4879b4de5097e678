"""Preprocessing: seeded stratified splits, train-only fitting, lossless JSON state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.ingest import load_digits_frame
from pipeline.preprocess import Preprocessor, augment_batch, features_labels, split_frame
from pipeline.validate import Schema

SCHEMA = Schema(tuple(f"pixel{i}" for i in range(64)), 10)


def test_split_is_seeded_stratified_and_disjoint():
    frame = load_digits_frame("all")
    a = split_frame(frame, 0.15, 0.2, seed=7)
    b = split_frame(frame, 0.15, 0.2, seed=7)
    c = split_frame(frame, 0.15, 0.2, seed=8)
    assert all(a[k].equals(b[k]) for k in a)
    assert not a["test"].equals(c["test"])
    assert sum(len(p) for p in a.values()) == len(frame)
    assert abs(len(a["test"]) - 0.2 * len(frame)) <= 1
    overall = np.bincount(frame["label"]) / len(frame)
    for part in a.values():
        share = np.bincount(part["label"], minlength=10) / len(part)
        assert np.abs(share - overall).max() < 0.02


def test_bad_split_sizes_are_refused():
    with pytest.raises(ValueError, match="bad split sizes"):
        split_frame(load_digits_frame("all"), 0.5, 0.5, seed=1)


def test_preprocessor_is_fitted_on_train_only():
    parts = split_frame(load_digits_frame("all"), 0.15, 0.2, seed=3)
    train_x, _ = features_labels(parts["train"], SCHEMA)
    test_x, _ = features_labels(parts["test"], SCHEMA)
    pre = Preprocessor.fit(train_x, SCHEMA)
    np.testing.assert_allclose(pre.mean, train_x.mean(axis=0), rtol=1e-6)
    assert not np.allclose(pre.mean, test_x.mean(axis=0))
    transformed = pre.transform(train_x)
    assert transformed.dtype == np.float32
    varying = train_x.std(axis=0) > 0
    np.testing.assert_allclose(transformed[:, varying].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(transformed[:, varying].std(axis=0), 1, atol=1e-3)
    assert np.isfinite(transformed).all()  # constant pixels are not divided by zero


def test_json_round_trip_transforms_identically():
    """Training and serving transform the same: serving rebuilds from the JSON alone."""
    frame = load_digits_frame("all")
    x, _ = features_labels(frame, SCHEMA)
    trained = Preprocessor.fit(x[:1000], SCHEMA)
    text = trained.to_json()
    assert "pickle" not in text and json.loads(text)["kind"] == "standardize"
    served = Preprocessor.from_json(text)
    np.testing.assert_array_equal(served.transform(x), trained.transform(x))


def test_transform_rejects_wrong_width():
    pre = Preprocessor.fit(np.ones((4, 64), dtype=np.float32), SCHEMA)
    with pytest.raises(ValueError, match="rows of 64 features"):
        pre.transform(np.ones((2, 63)))


def test_corrupt_state_is_refused():
    state = Preprocessor.fit(np.ones((4, 64), dtype=np.float32), SCHEMA).to_dict()
    state["mean"] = state["mean"][:10]
    with pytest.raises(ValueError, match="does not match"):
        Preprocessor.from_dict(state)


def test_augmentation_shifts_and_adds_noise_deterministically():
    batch = torch.zeros(4, 1, 8, 8)
    batch[:, :, 3, 3] = 1.0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    shifted = augment_batch(batch, max_shift=1, noise_std=0.0, generator=g1)
    assert shifted.shape == batch.shape and shifted.sum() == batch.sum()
    moved = shifted[0, 0].nonzero().tolist()[0]
    assert abs(moved[0] - 3) <= 1 and abs(moved[1] - 3) <= 1
    again = augment_batch(batch, max_shift=1, noise_std=0.0, generator=g2)
    assert torch.equal(shifted, again)
    noisy = augment_batch(
        batch, max_shift=0, noise_std=0.1, generator=torch.Generator().manual_seed(1)
    )
    assert 0.05 < (noisy - batch).std() < 0.15
