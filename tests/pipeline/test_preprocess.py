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
    pre = Preprocessor.fit(train_x, SCHEMA, "feature")
    np.testing.assert_allclose(pre.mean, train_x.mean(axis=0), rtol=1e-6)
    assert not np.allclose(pre.mean, test_x.mean(axis=0))
    transformed = pre.transform(train_x)
    assert transformed.dtype == np.float32
    varying = train_x.std(axis=0) > 0
    np.testing.assert_allclose(transformed[:, varying].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(transformed[:, varying].std(axis=0), 1, atol=1e-3)
    assert np.isfinite(transformed).all()  # constant pixels are not divided by zero


def test_images_are_scaled_globally_and_tables_per_feature():
    """Images keep the pixels' relative brightness: one mean and scale for all (a border
    pixel that is almost always 0 would otherwise get a scale that blows its rare ink up);
    tables keep per-feature standardisation; "auto" picks by the schema."""
    parts = split_frame(load_digits_frame("all"), 0.15, 0.2, seed=3)
    train_x, _ = features_labels(parts["train"], SCHEMA)
    image = Preprocessor.fit(train_x, SCHEMA)  # auto: 64 pixels are an 8x8 image
    assert image.scaling == "image"
    assert np.unique(image.mean).size == 1 and np.unique(image.scale).size == 1
    assert image.mean[0] == pytest.approx(train_x.mean(), rel=1e-5)
    out = image.transform(train_x)
    assert out.mean() == pytest.approx(0, abs=1e-4) and out.std() == pytest.approx(1, abs=1e-3)
    # the border: per-feature scaling turns a rare 1 in a nearly always-0 pixel into a huge
    # value; image scaling keeps it a faint stroke
    per_feature = Preprocessor.fit(train_x, SCHEMA, "feature")
    assert np.abs(per_feature.transform(train_x)).max() > 10 * np.abs(out).max()
    assert Preprocessor.from_json(image.to_json()).scaling == "image"

    table = Schema(("age", "income", "score"), 2)
    rows = np.array([[20, 1000, 0.1], [40, 5000, 0.9], [60, 9000, 0.5]], dtype=np.float32)
    pre = Preprocessor.fit(rows, table)
    assert pre.scaling == "feature"
    np.testing.assert_allclose(pre.transform(rows).std(axis=0), 1, atol=1e-5)
    with pytest.raises(ValueError, match="unknown scaling"):
        Preprocessor.fit(rows, table, "pixels")


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


def test_each_image_gets_its_own_shift_and_its_own_background():
    """Shifts differ between the images of a batch, and the uncovered border takes the
    image's background (after image scaling, the transformed 0 is negative, not 0)."""
    batch = torch.full((32, 1, 8, 8), -0.5)
    batch[:, :, 2:6, 2:6] = 2.0
    shifted = augment_batch(batch, 2, 0.0, torch.Generator().manual_seed(0))
    corners = {tuple(img[0].eq(2.0).nonzero().min(0).values.tolist()) for img in shifted}
    assert len(corners) > 5  # not one shift for the whole batch
    assert set(shifted.unique().tolist()) == {-0.5, 2.0}  # no 0 shifted in
    assert torch.equal(shifted.eq(2.0).sum((1, 2, 3)), batch.eq(2.0).sum((1, 2, 3)))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_changed_class_count_is_not_served_from_the_cache(tmp_path, streamed):
    """The processed output is reused for the same data and parameters; data.num_classes
    is one of them (the preprocessor's schema carries it): changed, the data is processed
    again (before, 3-class data kept its cached 10-class schema and trained 10 outputs)."""
    from pipeline import stages
    from pipeline.config import Params
    from pipeline.preprocess import load_preprocessor

    raw = tmp_path / "raw.parquet"
    frame = load_digits_frame("all").iloc[:600]
    frame.assign(label=frame["label"] % 3).to_parquet(raw, index=False)
    data = {"streaming_above_rows": 100 if streamed else 10**6, "chunk_rows": 256}
    out = tmp_path / "processed"
    for classes in (10, 10, 3):
        params = Params.model_validate({"data": {**data, "num_classes": classes}})
        stages.preprocess(raw, out, params)
        assert load_preprocessor(out).schema.num_classes == classes
