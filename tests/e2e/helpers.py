"""The `mlops` command as a user runs it: a subprocess on a project root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def mlops(
    root: Path, *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`mlops ARGS` in `root`, with the venv's tools on PATH and no tracking or Prefect
    server inherited from the test run (unless `env` names one)."""
    extra, env = (
        env,
        {
            **os.environ,
            "MLOPS_ROOT": str(root),
            "COLUMNS": "200",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        },
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [str(BIN / "mlops"), *args],
        cwd=root,
        env={**env, **(extra or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Prefect's temporary server (started by `mlops run` when no PREFECT_API_URL is set) shares
# the terminal; stopped while a database call of its own is under way on a loaded machine,
# its SQLAlchemy pool logs that call's cancellation with a traceback. That one is Prefect's.
_CHAINED = ("During handling of the above exception", "The above exception was the direct")


def output_of(done: subprocess.CompletedProcess) -> str:
    """stdout + stderr as the user reads them, less the temporary server's shutdown noise:
    from its "Exception during reset or similar" line to the CancelledError that ends it
    (chained tracebacks included)."""
    lines, out, i = (done.stdout + done.stderr).splitlines(keepends=True), [], 0
    while i < len(lines):
        if "Exception during reset or similar" not in lines[i]:
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines):
            line = lines[j]
            j += 1
            if line[:1].strip() and "CancelledError" in line:  # a traceback's last line
                rest = "".join(lines[j : j + 2]).lstrip("\n")
                if not rest.startswith(_CHAINED):
                    break
        i = j
    return "".join(out)


_ROW = re.compile(
    r"^\s*(?P<round>\d+)\s+(?P<data>[0-9a-f]+)\s+(?P<rows>\d+)\s+v(?P<model>\d+)\s+"
    r"(?P<acc>[\d.]+)\s+(?P<shadow>\S+)\s+(?P<gate>-|pass p=\S+|no p=\S+)\s+"
    r"(?P<decision>promoted|kept|canary ok|rollback|-)\s+v(?P<serves>\d+)\s+(?P<drift>\S+)\s*$"
)


def loop_rows(stdout: str) -> list[dict]:
    """The rows of `mlops run`'s results table (mlops/render.py's loop_table)."""
    return [m.groupdict() for line in stdout.splitlines() if (m := _ROW.match(line))]
