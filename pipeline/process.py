"""Process supervision: start a server as a child process group, wait until it answers, stop it.

One helper for every place that runs a server of ours or of a library's (`mlops serve`,
`prefect server start`, `mlflow server`): the CLI, the flows, the tests and the benches.
Stdlib and httpx only, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ProcessFailed(RuntimeError):
    """The supervised process exited, or did not become healthy in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(url: str, timeout: float = 1.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Supervised:
    """A child process in its own session (so a stop reaches its workers too)."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_healthy(self, health_path: str = "/health", timeout: float = 120) -> Supervised:
        """Poll `url + health_path` until it answers 200; raise if the process dies first.

        120 s: a cold `mlops serve` imports torch and MLflow and downloads the champion, a
        first `prefect server start` migrates its database; both take tens of seconds on a
        busy 2-core machine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{self.proc.args[0]} exited ({self.proc.returncode}); log {self.log_path}:\n"
                    f"{self.logs()}"
                )
            if is_healthy(self.url + health_path):
                return self
            time.sleep(0.2)
        self.kill()
        raise ProcessFailed(
            f"{self.url}{health_path} did not answer within {timeout:.0f} s; "
            f"log {self.log_path}:\n{self.logs()}"
        )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group (graceful: servers drain), SIGKILL if it hangs."""
        if self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s: killing it", self.proc.pid, timeout)
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash would."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start(
    cmd: Sequence[str],
    url: str,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Supervised:
    """Start `cmd` in a new session with stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Supervised(proc, url.rstrip("/"), log_path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
