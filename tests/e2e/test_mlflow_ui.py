"""The MLflow UI as a user opens it, in a real headless Chromium: `mlops ui` prints the pages
worth opening, and each renders what the project promises (the training runs with their
key metrics as columns, not MLflow's empty GenAI overview; the registered model with its
aliases; the promotion ledger with each decision in visible columns).

Chromium comes from Debian's `chromium` package (`.ci/run` installs it); Playwright drives
it and downloads no browser of its own. Where neither can be had the test is skipped and
says why.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.experiment import fit
from pipeline.gate import promote_on_test_split
from pipeline.ingest import ingest, load_digits_frame
from pipeline.preprocess import preprocess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = [  # this machine's network is closed: no background calls home
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium() -> str:
    """The browser, checked before anything is built."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    path = os.environ.get("MLOPS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip(
            "no Chromium on this machine: install Debian's `chromium` package "
            "(.ci/run does) or point MLOPS_CHROMIUM at a Chromium binary"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(settings, params):
    """Two trainings and their gate decisions: v1 champion, then v2 promoted or kept out."""
    pool = load_digits_frame("bootstrap", params.data.bootstrap_fraction, params.seed)
    ingest("digits", settings.raw_dir, settings.quarantine_dir, params, keep=lambda _: pool)
    preprocess(settings.raw_dir / "dataset.parquet", settings.processed_dir, params)
    decisions = []
    for epochs in (2, 4):
        cand = fit(settings, params, epochs=epochs, show_progress=False)
        decisions.append(promote_on_test_split(settings, params, cand.version))
    return decisions


@pytest.fixture
def ui(project, store):
    """`mlops ui` on a free port; yields the page addresses it printed."""
    port = _free_port()
    env = {**os.environ, "MLOPS_ROOT": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "mlops"), "ui", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        pages = {}
        for _ in range(4):  # the banner line, then runs, ledger, registry
            line = proc.stdout.readline()
            found = re.match(r"\s+(runs|ledger|registry)\s+(http\S+)", line)
            if found:
                pages[found[1]] = found[2]
        assert set(pages) == {"runs", "ledger", "registry"}, pages
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer /health within 90 s")
        yield pages
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _text(page, url: str, *expected: str) -> str:
    """Open `url` and wait until the rendered text holds every `expected` string."""
    page.goto(url)
    try:
        page.wait_for_function(
            "wanted => wanted.every(w => document.body.innerText.includes(w))",
            arg=list(expected),
            timeout=45_000,
        )
    except Exception:  # noqa: BLE001 - report what was rendered instead
        pytest.fail(f"{url} never showed {expected}; it showed:\n{page.inner_text('body')[:3000]}")
    return page.inner_text("body")


def test_the_mlflow_ui_opens_on_runs_registry_and_ledger(chromium, ui, store):
    from playwright import sync_api

    second = store[1]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1000})

        # the metric columns, a metric's value, each run's registered version (its column
        # fills in after the runs: the wait covers it)
        score = f"{store[0].candidate_score:.4f}"[:5]
        runs = _text(page, ui["runs"], "test_accuracy", "test_macro_f1", score, "v1", "v2")
        assert "Traces 0" not in runs and "No data available" not in runs
        assert "2 matching runs" in runs

        # v2 champion with v1 kept as challenger (to roll back to), or the other way round
        model = _text(page, ui["registry"], "Version 2", "Version 1", "champion", "challenger")
        assert "data_hash" in model  # the lineage tags of each version

        ledger = _text(page, ui["ledger"], "promote v1: v- -> v1", "reason")
        action = "promote" if second.promoted else "reject"
        assert f"{action} v2: v1 -> v{'2' if second.promoted else '1'}" in ledger
        assert second.reason in ledger  # the decision's reason, as a column
        assert "first version" in ledger
        browser.close()
