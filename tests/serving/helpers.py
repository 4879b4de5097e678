"""Small helpers shared by tests/serving and tests/reliability."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pandas as pd

from tests.conftest import REPO

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(interval)


def digits_stream() -> pd.DataFrame:
    """The demo's production stream, split as params.yaml says (bootstrap share and seed)."""
    from pipeline.config import load_params
    from pipeline.ingest import load_digits_frame

    params = load_params(REPO / "params.yaml")
    return load_digits_frame("stream", params.data.bootstrap_fraction, params.seed)
