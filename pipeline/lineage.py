"""Lineage: which code and which data a model came from.

prediction id -> model name@version -> MLflow run -> git commit + DVC data hash
(+ params, preprocessor state) -> the rows it was trained on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.ingest import file_md5


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty) of the repository holding `root`; ("unknown", False) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown", False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
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
    report_path = processed_dir / "report.json"
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
