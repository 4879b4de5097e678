"""The `mlops` command as a user meets it: exit codes and messages."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from mlops.cli import app
from pipeline.ingest import file_md5, load_digits_frame

runner = CliRunner()


def test_ingest_then_preprocess(project, params):
    """`mlops ingest` of the built-in digits is the whole set (1,797 images), not the loop's
    bootstrap pool, which users took for the data set."""
    result = runner.invoke(app, ["ingest"])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "data/reports/ingest.json").read_text())
    n = len(load_digits_frame("all"))
    assert n == 1797
    assert report["rows_ok"] == n and report["rows_quarantined"] == 0
    result = runner.invoke(app, ["preprocess"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["test"] == math.ceil(n * params.split.test_size) and sum(rows.values()) == n


def test_bad_file_exits_nonzero_with_one_clear_message(project, tmp_path):
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    before = file_md5(project / "data/raw/dataset.parquet")
    bad = tmp_path / "broken.csv"
    bad.write_bytes(b"label,pixel0\n1,\xff\n")
    result = runner.invoke(app, ["ingest", "--source", str(bad)])
    assert result.exit_code == 1
    assert f"error: {bad}: not UTF-8" in result.output
    assert "Traceback" not in result.output
    assert file_md5(project / "data/raw/dataset.parquet") == before


def test_preprocess_without_data_says_what_to_do(project):
    result = runner.invoke(app, ["preprocess"])
    assert result.exit_code == 1 and "run `mlops ingest` first" in result.output


def test_unknown_source_is_a_clear_error(project):
    result = runner.invoke(app, ["ingest", "--source", "no/such/file.csv"])
    assert result.exit_code == 1 and "no such file or directory" in result.output


def test_train_status_promote_rollback(project):
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    assert runner.invoke(app, ["preprocess"]).exit_code == 0
    result = runner.invoke(app, ["train", "--epochs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "registered as digits-classifier v1" in result.output
    assert "v1 promoted to @champion: first version" in result.output

    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["champion"]["version"] == "1" and status["challenger"] is None
    assert (
        status["champion"]["data_hash"]
        == json.loads((project / "data/reports/ingest.json").read_text())["data_hash"]
    )

    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 1 and "no previous champion" in result.output
    result = runner.invoke(app, ["promote", "7"])
    assert result.exit_code == 1 and "no version '7'" in result.output
    result = runner.invoke(app, ["promote", "1"])
    assert result.exit_code == 1 and "already the champion" in result.output

    # a second version, registered but not promoted; then promoted by hand and rolled back
    result = runner.invoke(app, ["train", "--epochs", "1", "--no-progress", "--no-promote"])
    assert result.exit_code == 0 and "registered as digits-classifier v2" in result.output
    assert json.loads(runner.invoke(app, ["status", "--json"]).stdout)["champion"]["version"] == "1"
    result = runner.invoke(app, ["promote", "2"])
    assert result.exit_code == 0, result.output
    assert "digits-classifier v2 is now @champion" in result.output
    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["champion"]["version"] == "2" and status["challenger"]["version"] == "1"
    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 0, result.output
    assert "@champion v2 -> v1" in result.output
    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["champion"]["version"] == "1" and status["challenger"]["version"] == "2"
    assert [e["action"] for e in status["ledger"][:2]] == ["rollback", "promote"]

    # a canary of v2 by hand: started, seen in both status commands, refused twice, aborted
    result = runner.invoke(app, ["rollout", "start", "2", "--fraction", "1.5"])
    assert result.exit_code == 1 and "--fraction must be between 0 and 1" in result.output
    result = runner.invoke(app, ["rollout", "start", "challenger", "--fraction", "0.25"])
    assert result.exit_code == 0, result.output
    assert "v2 takes 25% of clients beside @champion v1" in result.output
    result = runner.invoke(app, ["rollout", "start", "2"])
    assert result.exit_code == 1 and "already running" in result.output
    shown = runner.invoke(app, ["rollout", "status"]).output
    assert "v2 at 25% beside v1, running" in shown and "next: wait" in shown
    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["rollout"]["state"] == "running" and status["rollout"]["candidate"] == "2"
    result = runner.invoke(app, ["rollout", "abort"])
    assert result.exit_code == 0 and "canary v2 rolled back" in result.output
    assert "aborted" in runner.invoke(app, ["rollout", "status"]).output
    result = runner.invoke(app, ["rollout", "promote"])
    assert result.exit_code == 1 and "no rollout is running" in result.output
    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["champion"]["version"] == "1"
    assert [e["action"] for e in status["ledger"][:2]] == ["rollout-abort", "rollout-start"]


def test_registry_down_is_one_clear_line(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    assert "error: MLflow at http://127.0.0.1:9 is unreachable" in result.output
    assert "Traceback" not in result.output


def test_bad_params_file_is_one_clear_line(project):
    (project / "params.yaml").write_text("train:\n  epochs: 0\n  lr_typo: 3\n")
    result = runner.invoke(app, ["preprocess"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train.epochs" in result.output and "train.lr_typo" in result.output


def test_evaluate_and_cross_validation(project, params):
    for args in (
        ["ingest"],
        ["preprocess"],
        ["train", "--epochs", "3", "--no-progress", "--no-register"],
    ):
        assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "metrics.json").read_text())
    n_test = math.ceil(len(load_digits_frame("all")) * params.split.test_size)
    assert 0.5 < metrics["accuracy"] <= 1 and metrics["n"] == n_test
    assert (project / "data/reports/confusion_matrix.png").stat().st_size > 1000
    result = runner.invoke(app, ["evaluate", "--cv", "3"])
    assert result.exit_code == 0, result.output
    cv = json.loads((project / "data/reports/cv.json").read_text())
    assert len(cv["folds"]) == 3 and cv["accuracy_std"] >= 0 and 0.5 < cv["accuracy_mean"] <= 1


def test_a_model_trained_on_a_file_is_tagged_with_that_file(project, tmp_path):
    source = tmp_path / "digits.csv"
    load_digits_frame("all").iloc[:400].to_csv(source, index=False)
    for args in (["ingest", "--source", str(source)], ["preprocess"]):
        assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["train", "--epochs", "1", "--no-progress", "--no-promote"])
    assert result.exit_code == 0, result.output
    import mlflow

    version = mlflow.MlflowClient().get_model_version("digits-classifier", "1")
    assert version.tags["data_source"] == str(source)


def test_a_schema_change_needs_the_flag(project, tmp_path):
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    fewer = tmp_path / "fewer.csv"
    load_digits_frame("all").drop(columns="pixel63").to_csv(fewer, index=False)
    result = runner.invoke(app, ["ingest", "--source", str(fewer)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "63 feature columns where the current data has 64" in result.output
    result = runner.invoke(app, ["ingest", "--source", str(fewer), "--allow-schema-change"])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "data/reports/ingest.json").read_text())
    assert "63 feature columns" in report["schema_change"]


def test_run_refuses_quiet_and_verbose_together(project):
    result = runner.invoke(app, ["run", "--quiet", "--verbose"])
    assert result.exit_code == 2
    assert "--quiet and --verbose exclude each other" in result.output


def test_label_queue_exports_the_rows_worth_labelling_for_feedback(project):
    import numpy as np

    from pipeline.config import get_settings
    from pipeline.store import PredictionStore, encode_rows

    settings = get_settings()
    store = PredictionStore(settings.prediction_db).create()
    probs = np.array([[0.98, 0.02], [0.51, 0.49], [0.7, 0.3]], np.float32)
    x = encode_rows(np.zeros((3, 4), np.float32))
    store.insert(
        [(f"p{k}", 1.0 + k, settings.model_name, "1", x[k], 0, p, 1.0)
         for k, p in enumerate(encode_rows(probs))]
    )  # fmt: skip
    store.add_labels([("p2", 0)])  # labelled already: not in the queue
    store.dispose()

    result = runner.invoke(app, ["label-queue", "--budget", "5", "--out", "queue.json"])
    assert result.exit_code == 0, result.output
    body = json.loads((project / "queue.json").read_text())
    assert [r["id"] for r in body["labels"]] == ["p1", "p0"]  # the closest call first
    assert all(r["label"] is None for r in body["labels"])  # /feedback's shape, to fill in
    result = runner.invoke(app, ["label-queue", "--budget", "1", "--out", "queue.csv"])
    assert result.exit_code == 0 and (project / "queue.csv").read_text().startswith("id,label")
    assert "p1" in (project / "queue.csv").read_text()
    result = runner.invoke(app, ["label-queue", "--strategy", "vibes"])
    assert result.exit_code == 1 and "--strategy must be one of" in result.output


def test_a_source_past_the_threshold_streams_through_every_stage(project, tmp_path):
    """ingest (chunked), preprocess (parts) and train (from shards) from the command line,
    on a CSV with a bad row, when its rows pass data.streaming_above_rows."""
    import mlflow
    import pandas as pd
    import yaml

    params_file = project / "params.yaml"
    cfg = yaml.safe_load(params_file.read_text())
    cfg["data"].update(streaming_above_rows=500, chunk_rows=300)
    params_file.write_text(yaml.safe_dump(cfg))
    frame = load_digits_frame("all")
    frame.loc[7, "pixel3"] = None
    source = tmp_path / "digits.csv"
    frame.to_csv(source, index=False)

    result = runner.invoke(app, ["ingest", "--source", str(source)])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "data/reports/ingest.json").read_text())
    assert report["rows_ok"] == 1796 and report["rows_quarantined"] == 1
    result = runner.invoke(app, ["preprocess"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(rows.values()) == 1796
    assert len(list((project / "data/processed/train.parquet").glob("part-*.parquet"))) == 6
    assert len(pd.read_parquet(project / "data/processed/train.parquet")) == rows["train"]
    result = runner.invoke(app, ["train", "--epochs", "1", "--no-progress", "--no-register"])
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["tags.train_data"]) == {"shards"}  # 1,161 training rows > 500


def test_dask_workers_on_the_command_line_win_over_the_configured_cluster(monkeypatch, project):
    from mlops.cli import _dask
    from pipeline.config import get_settings

    get_settings.cache_clear()
    assert _dask(get_settings(), None) is None  # nothing configured: this process
    monkeypatch.setenv("MLOPS_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    get_settings.cache_clear()
    settings = get_settings()
    assert _dask(settings, None) == ("tcp://10.0.0.5:8786", 2)
    assert _dask(settings, 3) == (None, 3)  # a LocalCluster of 3
    assert _dask(settings, 0) is None  # this process, even with a cluster configured
    result = runner.invoke(app, ["preprocess", "--dask-workers", "-1"])
    assert result.exit_code == 2 and "dask-workers" in result.output.replace("\n", "")
    get_settings.cache_clear()


def test_pull_feedback_makes_the_labelled_rows_a_data_version(project):
    """`mlops pull-feedback`: the labelled predictions become rows of data/loop's
    feedback.parquet, versioned with DVC (a real git + DVC repo in the project); a second
    pull with nothing new changes nothing; rows that fail the schema are quarantined."""
    import numpy as np
    import pandas as pd

    from pipeline.config import get_settings
    from pipeline.store import LoggedRequest, PredictionStore

    assert runner.invoke(app, ["pull-feedback"]).exit_code == 1  # no processed data yet
    assert "run `mlops run`, or `mlops ingest` and `mlops preprocess`, first" in (
        runner.invoke(app, ["pull-feedback"]).output
    )
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    assert runner.invoke(app, ["preprocess"]).exit_code == 0
    settings = get_settings()
    digits = load_digits_frame("all").iloc[:6]
    x = digits.drop(columns="label").to_numpy(np.float32).copy()
    x[5, 3] = np.nan  # logged as sent; no feature for training
    store = PredictionStore(settings.prediction_db).create()
    ids = [f"fb-{k}" for k in range(6)]
    probs = np.full((6, 10), 0.1, np.float32)
    store.insert_requests(
        [LoggedRequest(ids, 1.0, settings.model_name, "1", x, [0] * 6, probs, 1.0)]
    )
    truth = digits["label"].tolist()
    store.add_labels([(ids[k], truth[k]) for k in (0, 1, 2, 5)])
    store.dispose()

    result = runner.invoke(app, ["pull-feedback"])
    assert result.exit_code == 0, result.output
    assert "4 labelled rows read, 3 new or relabelled, 1 quarantined" in result.output
    assert "data version " in result.output and (project / "data/loop.dvc").exists()
    feedback = pd.read_parquet(project / "data/loop/feedback.parquet")
    assert feedback["id"].tolist() == ids[:3] and feedback["label"].tolist() == truth[:3]
    pointer = (project / "data/loop.dvc").read_text()

    again = runner.invoke(app, ["pull-feedback"])
    assert again.exit_code == 0 and "nothing new" in again.output, again.output
    assert (project / "data/loop.dvc").read_text() == pointer
