"""DVC: a real git + DVC repository in a temp dir runs the project's own dvc.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.ingest import file_md5
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _sh(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLOPS_ROOT": str(repo)}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "bin", repo / "bin")  # the stages' `bin/mlops`
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = 5  # keep the test quick; the stages are what is under test
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.email", "ci@example.invalid")
    _sh(repo, "git", "config", "user.name", "ci")
    _sh(repo, "dvc", "init", "-q")
    _sh(repo, "dvc", "config", "core.analytics", "false")
    _sh(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    return repo


def test_repro_reproduces_restores_and_reruns_only_what_changed(dvc_repo: Path):
    repo = dvc_repo
    _sh(repo, "dvc", "repro")
    snapshot = repo / "data/raw/dataset.parquet"
    assert snapshot.exists() and (repo / "data/processed/train.parquet").exists()
    metrics = _sh(repo, "dvc", "metrics", "show")
    accuracy = json.loads((repo / "metrics.json").read_text())["accuracy"]
    assert "metrics.json" in metrics and f"{accuracy:.5f}"[:5] in metrics
    assert 0.5 < accuracy <= 1  # 5 epochs: the stage runs; accuracy is tested elsewhere

    second = _sh(repo, "dvc", "repro")
    assert "didn't change, skipping" in second and "Running stage" not in second
    assert "up to date" in _sh(repo, "dvc", "status").lower()

    # The hash the code reports is the hash DVC recorded for the data version.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["ingest"]["outs"]}
    report = json.loads((repo / "data/reports/ingest.json").read_text())
    assert outs["data/raw/dataset.parquet"] == report["data_hash"] == file_md5(snapshot)

    # Deleted data comes back from the cache, and from the remote after the cache is gone.
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "data version 1")
    _sh(repo, "dvc", "push")
    snapshot.unlink()
    shutil.rmtree(repo / "data/processed")
    _sh(repo, "dvc", "checkout")
    assert file_md5(snapshot) == report["data_hash"]
    assert (repo / "data/processed/preprocessor.json").exists()

    snapshot.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    _sh(repo, "dvc", "pull")
    assert file_md5(snapshot) == report["data_hash"]
    assert "up to date" in _sh(repo, "dvc", "status").lower()

    # A changed parameter reruns only the stages that depend on it (the same repository:
    # a second one would cost a whole `dvc repro` more of the suite's time).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["test_size"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = _sh(repo, "dvc", "repro")
    assert "Stage 'ingest' didn't change" in out
    assert "Running stage 'preprocess'" in out and "Running stage 'train'" in out


@pytest.mark.parametrize("inside_a_repo", [False, True])
def test_loop_root_becomes_a_dvc_project_without_nesting_git(tmp_path: Path, inside_a_repo):
    """A root inside the user's own git repository gets a DVC subdirectory project of that
    repository, not a git repository of its own; elsewhere it gets both."""
    from pipeline.lineage import ensure_dvc_repo, version_data

    outer = tmp_path / "outer"
    root = outer / "experiments" / "digits"
    root.mkdir(parents=True)
    if inside_a_repo:
        subprocess.run(["git", "init", "-q"], cwd=outer, check=True)
    ensure_dvc_repo(root)
    assert (root / ".dvc").is_dir()
    assert (root / ".git").exists() is not inside_a_repo
    data = root / "data" / "loop"
    data.mkdir(parents=True)
    (data / "rows.csv").write_text("label,x\n1,0.5\n")
    digest = version_data(root, data, push=False)
    assert digest.endswith(".dir") and (root / "data" / "loop.dvc").exists()
    toplevel = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    assert Path(toplevel).resolve() == (outer if inside_a_repo else root).resolve()
    ensure_dvc_repo(root)  # a second call changes nothing
    assert (root / ".git").exists() is not inside_a_repo


@pytest.mark.parametrize("layout", ["project checkout", "subdirectory project"])
def test_a_version_restores_under_the_projects_own_gitignore(tmp_path: Path, layout):
    """`mlops reproduce` restores into data/reproduce/, which the project's .gitignore
    covers: DVC must accept it there (it refuses a git-ignored .dvc file), in the project's
    own checkout and as a DVC subdirectory project, and leave nothing untracked behind."""
    from pipeline.lineage import DataVersionError, ensure_dvc_repo, restore_data, version_data

    repo = tmp_path / "checkout"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    root = repo if layout == "project checkout" else repo / "experiments"
    root.mkdir(exist_ok=True)
    if root != repo:
        shutil.copy(REPO / ".gitignore", root / ".gitignore")
    ensure_dvc_repo(root)
    data = root / "data" / "loop"
    data.mkdir(parents=True)
    (data / "rows.csv").write_text("label,x\n1,0.5\n2,0.25\n")
    digest = version_data(root, data, push=False)

    def untracked() -> set[str]:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {line[3:] for line in out.splitlines()}

    before = untracked()
    target = root / "data" / "reproduce" / "v1" / "loop"
    restore_data(root, target, digest)
    assert (target / "rows.csv").read_text() == "label,x\n1,0.5\n2,0.25\n"
    assert untracked() == before  # restored data ignored, no .dvc handle left over
    with pytest.raises(
        DataVersionError, match="neither in the DVC cache nor on.*`mlops train` run by hand do not"
    ):
        restore_data(root, root / "data" / "reproduce" / "v9" / "loop", "0" * 32 + ".dir")
    assert untracked() == before


def test_the_commit_is_dirty_for_code_and_params_not_for_data(tmp_path: Path):
    from pipeline.lineage import git_commit

    repo = tmp_path / "repo"
    (repo / "data" / "reports").mkdir(parents=True)
    (repo / "pipeline").mkdir()
    files = {
        "pipeline/model.py": "x = 1\n",
        "params.yaml": "seed: 1\n",
        "metrics.json": "{}\n",
        "data/reports/ingest.json": "{}\n",
        "data/.gitignore": "/raw\n",
    }
    for name, text in files.items():
        (repo / name).write_text(text)
    for args in (
        ["init", "-q"],
        ["add", "."],
        ["-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    sha, dirty = git_commit(repo)
    assert len(sha) == 40 and not dirty
    for name in ("metrics.json", "data/reports/ingest.json", "data/.gitignore"):
        (repo / name).write_text("rewritten by the loop\n")
    (repo / "data" / "loop.dvc").write_text("outs: []\n")  # untracked
    assert git_commit(repo) == (sha, False)
    for name in ("params.yaml", "pipeline/model.py"):
        (repo / name).write_text("changed by hand\n")
        assert git_commit(repo) == (sha, True), name
        subprocess.run(["git", "checkout", "-q", "--", name], cwd=repo, check=True)


def test_a_remote_that_refuses_the_push_leaves_the_version_in_the_cache(tmp_path: Path, caplog):
    """The loop must not die because its remote is unreachable or read-only: the version is
    in the local cache, one warning says so, and `dvc push` later sends it."""
    from pipeline.lineage import ensure_dvc_repo, version_data

    root = tmp_path / "root"
    root.mkdir()
    ensure_dvc_repo(root)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the remote's directory should be")
    _sh(root, "dvc", "remote", "add", "-d", "local", str(blocker / "remote"))
    data = root / "data" / "loop"
    data.mkdir(parents=True)
    (data / "rows.csv").write_text("label,x\n1,0.5\n")
    with caplog.at_level("WARNING", logger="pipeline.lineage"):
        digest = version_data(root, data)
    assert digest.endswith(".dir")
    [warning] = [r.getMessage() for r in caplog.records if r.name == "pipeline.lineage"]
    assert digest in warning and "'local'" in warning and "dvc push" in warning
    assert len(warning.splitlines()) == 1
    cache = root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    assert cache.exists()  # nothing lost: the version is restorable from the cache

    _sh(root, "dvc", "remote", "modify", "local", "url", str(tmp_path / "remote"))
    _sh(root, "dvc", "push")  # the later push the warning names sends it
    assert any((tmp_path / "remote").rglob(digest[2:]))


def test_the_checkout_ships_no_dvc_pointer_or_lock():
    """A fresh clone has no data of its own: a committed `data/loop.dvc` (one slipped in
    with an unrelated commit) pointed at a version in nobody's cache or remote, so on every
    fresh clone `dvc status` said "not in cache: data/loop" and `dvc pull` failed. The
    pointers and dvc.lock are what users commit after their own runs."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "*.dvc", "dvc.lock", "**/dvc.lock"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked == []
