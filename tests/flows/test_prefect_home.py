"""The suite's Prefect runs never land in the user's ~/.prefect."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TEST_PREFECT_HOME


def test_prefect_home_is_the_suites_own():
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).resolve()
    assert home == Path(TEST_PREFECT_HOME).resolve()
    assert home != (Path.home() / ".prefect").resolve()
