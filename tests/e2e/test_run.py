"""`mlops run --rounds 2` end to end, as a user runs it: real MLflow SQLite, real git + DVC
repository, real server process; then lineage of a real prediction and reproduction."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

from tests.conftest import REPO
from tests.e2e.helpers import loop_rows, output_of
from tests.e2e.helpers import mlops as _mlops

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_mlops_run_two_rounds_then_lineage_and_reproduce(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)

    done = _mlops(root, "run", "--rounds", "2", "--trials", "1", "--epochs", "5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = loop_rows(done.stdout)
    assert [r["round"] for r in table] == ["1", "2"], done.stdout[-2000:]
    assert int(table[1]["rows"]) > int(table[0]["rows"])  # round 2 trained on the feedback too
    assert table[1]["gate"].startswith(("pass p=", "no p="))  # the paired gate decided
    assert "Traceback" not in output_of(done)
    assert "Add type hints" not in done.stdout + done.stderr
    # each finished step is one line with its name and time, in place of Prefect's nameless
    # "Finished in state Completed()"; rounds are marked
    out = done.stdout + done.stderr
    assert "Finished in state" not in out
    for step in ("ingest digits", "start API server", "train round 2 (1 tuning trials)"):
        assert f"done  {step}" in out, out[-3000:]
    assert "round 1 of 2" in out and "round 2 of 2" in out
    assert "starting Prefect's API" in out  # the first seconds are not silent either
    assert "trial 1/1: val accuracy" in out

    pid = (
        sqlite3.connect(root / "predictions.db")
        .execute(
            "SELECT id FROM predictions WHERE true_label IS NOT NULL AND model_version = '1' "
            "LIMIT 1"
        )
        .fetchone()[0]
    )
    lineage = _mlops(root, "lineage", pid, "--json")
    assert lineage.returncode == 0, lineage.stderr
    info = json.loads(lineage.stdout)
    assert info["model"]["version"] == "1" and info["data"]["hash"].endswith(".dir")
    assert info["data"]["where"]["in_cache"] is True

    repro = _mlops(root, "reproduce", "2")
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "hash verified" in repro.stdout and "identical" in repro.stdout
    assert " 0 of " in repro.stdout  # every test prediction the same

    # today's params.yaml no longer says what v2 was trained with (another class count,
    # another scaling): the reproduction takes them from the version itself
    edited = (root / "params.yaml").read_text()
    assert "num_classes: 10" in edited and "scaling: auto" in edited
    edited = edited.replace("num_classes: 10", "num_classes: 12")
    (root / "params.yaml").write_text(edited.replace("scaling: auto", "scaling: feature"))
    repro = _mlops(root, "reproduce", "2")
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "identical" in repro.stdout and " 0 of " in repro.stdout, repro.stdout

    missing = _mlops(root, "lineage", "no-such-id")
    assert missing.returncode == 1 and "no prediction with id 'no-such-id'" in missing.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not UTF-8"),
        (b"label,pixel0,pixel1\n1,0,0\n2,0", "truncated"),
        (None, "no such file or directory"),
    ],
)
def test_mlops_run_on_a_bad_source_says_one_line(tmp_path, content, message):
    """The same one clear line `mlops ingest` prints, no Prefect traceback around it, and
    before Prefect's temporary server was started (it keeps its database in PREFECT_HOME)."""
    root = tmp_path / "demo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    bad = tmp_path / "bad.csv"
    if content is not None:
        bad.write_bytes(content)
    home = tmp_path / "prefect-home"
    done = _mlops(
        root, "run", "--rounds", "1", "--source", str(bad), timeout=300,
        env={"PREFECT_HOME": str(home)},
    )  # fmt: skip
    output = output_of(done)
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), output
    assert message in errors[0]
    assert "Traceback" not in output
    assert not list(home.rglob("*.db")), "Prefect's server was started before the check"


def test_reproduce_and_lineage_of_unknown_things_say_one_line(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for args, message in (
        (("reproduce", "99"), "no version '99'"),
        (("reproduce", "latest"), "not a version number"),
    ):
        done = _mlops(root, *args, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        assert message in done.stderr and "Traceback" not in done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
