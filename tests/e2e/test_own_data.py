"""A user's own data, as a newcomer brings it: a learnable 28x28 set of a few thousand
strokes in the Kaggle CSV layout, `mlops run --rounds 2` on it in a git clone of the
project (its real .gitignore, DVC config and remote), then lineage and reproduction."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import BIN, loop_rows, output_of
from tests.e2e.helpers import mlops as _mlops

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def strokes(n: int, seed: int = 0) -> pd.DataFrame:
    """`label, pixel0..pixel783`, pixels 0-255: class k is a stroke at angle k * 18 degrees
    through a jittered centre, with random length, thickness and background noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:28, 0:28]
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.float32)
    for k, label in enumerate(labels):
        angle = np.deg2rad(label * 18 + rng.normal(0, 3))
        cy, cx = 14 + rng.normal(0, 1.5, size=2)
        half = rng.uniform(7, 11)
        # distance of each pixel to the segment through (cy, cx) along the angle
        dy, dx = yy - cy, xx - cx
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = np.abs(-dx * np.sin(angle) + dy * np.cos(angle))
        ink = (across < rng.uniform(1.0, 2.0)) & (np.abs(along) < half)
        images[k][ink] = rng.uniform(180, 255)
    frame = pd.DataFrame(images.reshape(n, -1).round(), columns=[f"pixel{i}" for i in range(784)])
    frame.insert(0, "label", labels)
    return frame


def test_the_loop_closes_and_reproduces_on_the_users_own_28x28_csv(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    source = tmp_path / "strokes.csv"
    strokes(2400).to_csv(source, index=False)

    done = _mlops(
        clone,
        "run",
        "--rounds",
        "2",
        "--source",
        str(source),
        "--trials",
        "0",
        "--epochs",
        "3",
        "--quiet",
    )
    output = output_of(done)
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # --quiet: the results table alone, no step lines, no info lines
    assert "done  " not in output and "INFO" not in output, output[-3000:]
    table = loop_rows(done.stdout)
    assert [r["round"] for r in table] == ["1", "2"], done.stdout[-2000:]
    assert int(table[1]["rows"]) > int(table[0]["rows"])  # round 2 trained on more rows ...
    assert table[1]["data"] != table[0]["data"]  # ... of a new data version
    assert float(table[0]["acc"]) > 0.5  # strokes are learnable

    # the logged versions: v1 served round 1 and round 2's shadow half; v2 only answered
    # if its canary started
    log = sqlite3.connect(clone / "predictions.db")
    versions = {v for (v,) in log.execute("SELECT DISTINCT model_version FROM prediction_rows")}
    canary = table[1]["decision"] in ("canary ok", "rollback")
    assert versions == ({"1", "2"} if canary else {"1"}), (versions, table[1])
    assert table[1]["serves"] == ("2" if table[1]["decision"] == "canary ok" else "1")
    pid = log.execute("SELECT id FROM predictions WHERE true_label IS NOT NULL LIMIT 1").fetchone()[
        0
    ]

    lineage = _mlops(clone, "lineage", pid, "--json")
    assert lineage.returncode == 0, lineage.stderr
    info = json.loads(lineage.stdout)
    assert info["data"]["source"] == str(source) and info["data"]["source_hash"]
    assert info["data"]["where"]["restore"] == f"mlops reproduce {info['model']['version']}"
    text = _mlops(clone, "lineage", pid)
    assert f"(source {source}" in text.stdout and "mlops reproduce" in text.stdout

    # batch scoring of the user's whole file (784 pixels and a label column it ignores)
    scored = tmp_path / "scored.parquet"
    batch = _mlops(clone, "predict", str(source), "--out", str(scored), "--log")
    assert batch.returncode == 0, batch.stdout + batch.stderr
    assert "2,400 rows scored by digits-classifier" in batch.stdout
    labels = pd.read_parquet(scored)["label"].to_numpy()
    assert (labels == pd.read_csv(source, usecols=["label"])["label"].to_numpy()).mean() > 0.5

    for version in ("1", "2"):
        repro = _mlops(clone, "reproduce", version)
        assert repro.returncode == 0, repro.stdout + repro.stderr
        assert "identical" in repro.stdout, repro.stdout
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert "data/reproduce" not in status  # restored data stays out of git's way

    # A second clone pulls the loop's newest data version from the remote the loop pushed to
    # (the default remote lies beside the checkout, so clones on one machine share it) once
    # the user commits its pointer, and reproduces an older version through a shared registry.
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run([*git, "add", "data/loop.dvc"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "loop data version"], cwd=clone, check=True)
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(clone), str(second)], check=True)
    pulled = subprocess.run(
        [str(BIN / "dvc"), "pull", "data/loop.dvc"], cwd=second, capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    for name in ("bootstrap.parquet", "feedback.parquet"):
        assert (second / "data/loop" / name).read_bytes() == (
            clone / "data/loop" / name
        ).read_bytes()
    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
    repro = _mlops(second, "reproduce", "1", env=shared)
    assert repro.returncode == 0 and "identical" in repro.stdout, repro.stdout + repro.stderr
