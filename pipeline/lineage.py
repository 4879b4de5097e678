"""Lineage: which code and which data a model came from.

prediction id -> model name@version -> MLflow run -> git commit + DVC data hash
(+ params, preprocessor state) -> the rows it was trained on.
"""

from __future__ import annotations

import json
import logging
import subprocess
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from pipeline.ingest import file_md5
from pipeline.preprocess import REPORT_FILE

log = logging.getLogger(__name__)

# What the stages and the loop write into a checkout: their changes are data, not code, so
# they do not make a commit "dirty" (the data version is recorded apart, by its DVC hash).
WRITTEN_BY_THE_LOOP = ("data", "models", "metrics.json", "dvc.lock")


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty) of the repository holding `root`; ("unknown", False) outside git.

    Dirty means a tracked file of code or parameters differs from the commit: changes under
    WRITTEN_BY_THE_LOOP (relative to `root`) and untracked files do not count."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown", False
        excluded = [f":(exclude){path}" for path in WRITTEN_BY_THE_LOOP]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def data_version(processed_dir: Path, raw: Path | None = None) -> dict:
    """The data version a model is trained on: the raw snapshot's DVC hash and split sizes."""
    report_path = processed_dir / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    data_hash = report.get("data_hash") or (file_md5(raw) if raw and raw.exists() else "unknown")
    return {"data_hash": data_hash, "rows": report.get("rows", {})}


def lineage_tags(root: Path, data_hash: str, source: str, device: str, warm_start: bool) -> dict:
    commit, dirty = git_commit(root)
    return {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_hash": data_hash,
        "data_source": source,
        "device": device,
        "warm_start": str(warm_start).lower(),
    }


# --- DVC data versions ------------------------------------------------------------------------


class DataVersionError(RuntimeError):
    pass


@contextmanager
def _quiet_dvc(root: Path | None = None):
    """Run DVC from `root` (it resolves paths against the working directory) and keep its
    CLI hints ("To track the changes with git...") out of our output."""
    import io
    import logging
    import os

    loggers = [logging.getLogger(n) for n in ("dvc", "dvc_data", "dvc_objects", "scmrepo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    cwd = os.getcwd()
    try:
        if root is not None:
            os.chdir(root)
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        os.chdir(cwd)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def ensure_dvc_repo(root: Path) -> None:
    """The loop versions its data with DVC: make `root` a DVC project if it is not.

    Inside an existing git work tree (a folder of the user's own repository), DVC is set up
    as a subdirectory project of that repository; elsewhere `root` becomes a new git repo.
    """
    from dvc.repo import Repo

    if (root / ".dvc").is_dir():
        return
    enclosing = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True
    )
    inside = (
        enclosing.returncode == 0 and Path(enclosing.stdout.strip()).resolve() != root.resolve()
    )
    if not inside and not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with _quiet_dvc(root):
        Repo.init(str(root), subdir=inside)
    with Repo(str(root)) as repo, repo.config.edit() as conf:
        conf["core"]["analytics"] = "false"


def version_data(root: Path, data_dir: Path, push: bool = True) -> str:
    """`dvc add` the directory (a new data version) and push it; returns DVC's hash of it.

    A remote that cannot take the push (unreachable, read-only) does not stop the loop: the
    version is in the local DVC cache, the failure is logged in one line, and a later
    `dvc push` (or the next version's push) sends it."""
    from dvc.repo import Repo

    target = str(data_dir.relative_to(root))
    with _quiet_dvc(root), Repo(str(root)) as repo:
        repo.add(target)
        digest = _dvc_hash(data_dir)
        remote = repo.config["core"].get("remote")
        if push and remote:
            try:
                repo.push(targets=[target + ".dvc"])
            except Exception as exc:  # noqa: BLE001 - the cache holds it; say so, go on
                first = (str(exc).strip().splitlines() or [""])[0]
                log.warning(
                    "data version %s is in the local DVC cache but not on remote %r "
                    "(%s: %s); run `dvc push` once the remote is reachable",
                    digest,
                    remote,
                    type(exc).__name__,
                    first,
                )
    return digest


def _dvc_hash(data_dir: Path) -> str:
    import yaml

    dvcfile = data_dir.with_name(data_dir.name + ".dvc")
    return yaml.safe_load(dvcfile.read_text())["outs"][0]["md5"]


def restore_data(root: Path, data_dir: Path, digest: str) -> None:
    """Put the data version `digest` (a directory's `.dir` hash or a file's) at `data_dir`
    through DVC (its cache, else the remote), then check what is there hashes to `digest`."""
    import yaml
    from dvc.repo import Repo

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    dvcfile = data_dir.with_name(data_dir.name + ".dvc")
    spec = {"outs": [{"md5": digest, "path": data_dir.name, "hash": "md5"}]}
    dvcfile.write_text(yaml.safe_dump(spec, sort_keys=False))
    target = str(dvcfile.relative_to(root))
    try:
        with _quiet_dvc(root), Repo(str(root)) as repo:
            try:
                repo.checkout(targets=[target], force=True)
            except Exception:  # noqa: BLE001 - not in the local cache: fetch it from the remote
                try:
                    repo.pull(targets=[target], force=True)
                except Exception as exc:  # noqa: BLE001 - one line for the user
                    raise DataVersionError(
                        f"data version {digest} is neither in the DVC cache nor on the default "
                        f"remote ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
                        "`dvc repro` and `mlops run` put their data there, `mlops ingest` and "
                        "`mlops train` run by hand do not: a model trained so cannot be "
                        "reproduced from DVC"
                    ) from exc
            repo.add(str(data_dir.relative_to(root)))  # re-hash what is on disk
        restored = _dvc_hash(data_dir)
    finally:  # the handle has done its work; leave no untracked file behind
        dvcfile.unlink(missing_ok=True)
    if restored != digest:
        raise DataVersionError(f"restored {data_dir} hashes to {restored}, expected {digest}")
