"""What routes depend on: the per-process `State`, and the API-key and admin-token checks.

Every dependency here is `async` on purpose: FastAPI runs plain-`def` dependencies in a
thread pool, one hop per request that the event loop would pay for.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from pipeline.config import Settings
from pipeline.store import PredictionStore
from serving.canary import Canary
from serving.protocol import requests_in_flight
from serving.requests import BadRequest
from serving.runtime import LogWriter, MicroBatcher, ModelManager, SideWriter, answers_coming
from serving.shadow import Shadow


class State:
    """Everything the routes need, built once per server process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = ModelManager(settings)
        self.batcher = MicroBatcher(
            self.manager,
            settings.batch_max_rows,
            settings.batch_max_wait_ms / 1000,
            inline_rows=settings.batch_inline_rows,
        )
        self.store = PredictionStore(settings.prediction_db)
        self.writer = LogWriter(self.store, settings.log_queue_max, sharers=settings.serve_workers)
        self.side = SideWriter()  # shadow rows and canary events: off the response path
        self.shadow = Shadow(settings, self.store, self.writer) if settings.shadow_model else None
        self.canary = Canary(settings, self.store, self.side, self.manager, self.batcher)
        # a small group waits for the next while more answers are on their way
        self.writer.more_coming = lambda: answers_coming(
            requests_in_flight(), self.writer, self.batcher, self.canary.batcher
        )


async def get_state(request: Request) -> State:
    return request.app.state.mlops


StateDep = Annotated[State, Depends(get_state)]


def _same_secret(sent: str, secret) -> bool:
    """Constant-time comparison (hmac.compare_digest): a wrong guess takes as long whether
    it shares a prefix with the secret or not, so timing does not leak the secret."""
    return hmac.compare_digest(sent.encode(), secret.get_secret_value().encode())


async def require_api_key(request: Request) -> None:
    """X-API-Key must match MLOPS_API_KEY when one is configured."""
    check_api_key(request.app.state.mlops.settings, request.headers)


def check_api_key(settings: Settings, headers) -> None:
    """The check itself, on any mapping of lower-case header names (the fast path's too)."""
    key = settings.api_key
    if key is None:
        return
    # Surrounding whitespace is trimmed on both sides alike (HTTP strips the leading part
    # anyway), so a key pasted with a trailing space or newline still matches.
    if not _same_secret(headers.get("x-api-key", "").strip(), key):
        raise BadRequest(401, "missing or wrong X-API-Key")


async def require_admin(request: Request) -> None:
    """`Authorization: Bearer <MLOPS_ADMIN_TOKEN>`; without a configured token: 403."""
    token = request.app.state.mlops.settings.admin_token
    if token is None:
        raise BadRequest(403, "admin routes are disabled: set MLOPS_ADMIN_TOKEN to enable them")
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _same_secret(sent, token):
        raise BadRequest(401, "missing or wrong bearer token")


ApiKey = Depends(require_api_key)
Admin = Depends(require_admin)
