"""The reliability suite reuses the serving fixtures (a registered champion, live servers)
and the flow fixtures (a real Prefect API, a git + DVC project)."""

from tests.flows.conftest import loop_project, prefect_api  # noqa: F401
from tests.serving.conftest import base_project, digits_rows, live_server, served  # noqa: F401
