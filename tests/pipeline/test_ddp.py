"""DistributedDataParallel on CPU: `torchrun --nproc-per-node 2` trains and logs exactly one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.model import Predictor

pytestmark = pytest.mark.slow


def test_torchrun_two_cpu_processes_log_one_run(prepared, settings):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {
        **os.environ,
        "MLOPS_ROOT": str(settings.root),
        "MLOPS_DEVICE": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "pipeline.ddp",
            "--epochs",
            "3",
            "--no-progress",
            "--run-name",
            "ddp-test",
        ],
        cwd=settings.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    mlflow.set_tracking_uri(settings.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[settings.model_name], output_format="list")
    assert [r.info.run_name for r in runs] == ["ddp-test"]  # rank 1 logged nothing
    run = runs[0]
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")]
    assert steps == sorted(set(steps)) and 1 <= len(steps) <= 3  # one value per epoch, not per rank
    predictor = Predictor.from_dir(settings.models_dir)
    assert run.data.metrics["test_accuracy"] > 0.3 and predictor.cfg.kind == "cnn"


def test_flows_reach_torchrun_through_a_setting(prepared, settings, params, monkeypatch):
    """MLOPS_TRAIN_PROCESSES=2: fit() (what the flows call) trains under torchrun, one run."""
    from pipeline.config import get_settings
    from pipeline.experiment import fit

    monkeypatch.setenv("MLOPS_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    get_settings.cache_clear()
    cand = fit(get_settings(), params, epochs=2, run_name="ddp-fit", show_progress=False)
    assert cand.version == "1" and 0 < cand.metrics["accuracy"] <= 1
    runs = mlflow.search_runs(experiment_names=[settings.model_name], output_format="list")
    assert [r.info.run_name for r in runs] == ["ddp-fit"]
    assert runs[0].data.tags["world_size"] == "2"


def test_torchrun_trains_from_shards(prepared, settings, params, monkeypatch):
    """Two ranks read their halves of the training split's row groups (the demo's split is
    one row group, so each rank takes part of it) and step together: one run, tagged."""
    from pipeline.config import get_settings
    from pipeline.experiment import fit

    monkeypatch.setenv("MLOPS_TRAIN_PROCESSES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    get_settings.cache_clear()
    on = params.updated(train={"from_shards": "on"})
    cand = fit(get_settings(), on, epochs=2, run_name="ddp-shards", show_progress=False)
    assert cand.metrics["accuracy"] > 0.3
    runs = mlflow.search_runs(experiment_names=[settings.model_name], output_format="list")
    assert [r.info.run_name for r in runs] == ["ddp-shards"]
    tags = runs[0].data.tags
    assert tags["world_size"] == "2" and tags["train_data"] == "shards"
