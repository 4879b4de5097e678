"""params.yaml's schema: one place for each default, clear errors for a wrong file."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import Params, ParamsError, Settings, load_params, sqlalchemy_url
from tests.conftest import REPO


def test_the_shipped_params_yaml_spells_out_the_defaults():
    """params.yaml is what DVC tracks and users edit; its values are the schema's defaults,
    so the two cannot drift apart (change both, or neither)."""
    assert load_params(REPO / "params.yaml") == Params()
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(written) == set(Params.model_fields)  # every section is spelled out


def test_a_missing_file_or_key_takes_the_defaults(tmp_path):
    assert load_params(tmp_path / "absent.yaml") == Params()
    path = tmp_path / "params.yaml"
    path.write_text("seed: 7\ntrain:\n  epochs: 3\n")
    params = load_params(path)
    assert params.seed == 7 and params.train.epochs == 3
    assert params.train.lr == Params().train.lr and params.split == Params().split


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epoch: 3\n", "train.epoch: Extra inputs are not permitted"),
        ("split:\n  val_size: 0.5\n  test_size: 0.5\n", "at least 10% to train on"),
        ("tune:\n  space:\n    lr: {low: 0.1, high: 0.01}\n", "must be below high"),
        ("data:\n  num_classes: one\n", "data.num_classes"),
        ("[1, 2]\n", "expected a mapping"),
        ("seed: [\n", "not valid YAML"),
    ],
)
def test_a_wrong_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="params.yaml") as err:
        load_params(path)
    assert message in str(err.value)


def test_updated_revalidates():
    params = Params().updated(seed=3, train={"epochs": 2})
    assert params.seed == 3 and params.train.epochs == 2 and params.train.lr == Params().train.lr
    with pytest.raises(ValueError):
        Params().updated(train={"epochs": 0})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_the_prediction_db_url_is_normalised_once_in_settings(given, expected, monkeypatch):
    assert sqlalchemy_url(given) == expected
    monkeypatch.setenv("MLOPS_PREDICTION_DB_URL", given)
    assert Settings().prediction_db == expected
