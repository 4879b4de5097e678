"""The `mlops` command as a user meets it: exit codes and messages."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.ingest import file_md5

runner = CliRunner()


def test_ingest_then_preprocess(project):
    result = runner.invoke(app, ["ingest"])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "data/reports/ingest.json").read_text())
    assert report["rows_ok"] == 628 and report["rows_quarantined"] == 0
    result = runner.invoke(app, ["preprocess"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["test"] == 126 and sum(rows.values()) == 628


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
