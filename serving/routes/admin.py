"""Admin: reload the model now (bearer MLOPS_ADMIN_TOKEN; closed when none is configured)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter
from fastapi.responses import Response

from pipeline.registry import RegistryError
from serving.deps import Admin, StateDep
from serving.responses import error, json_response
from serving.schemas import ReloadResponse, responses

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Admin])


@router.post("/reload", responses=responses(ReloadResponse, 401, 403, 404, 503))
async def reload(state: StateDep, version: str | None = None) -> Response:
    """Load the configured alias now (or ?version=N); the old model serves until then."""
    current = state.manager.current
    try:
        changed = await asyncio.to_thread(state.manager.refresh, version)
    except (LookupError, RegistryError) as exc:  # no such version or alias
        return error(404, f"{exc}; still serving v{current.version if current else '-'}")
    except Exception as exc:  # noqa: BLE001 - reported, old model keeps serving
        current = state.manager.current
        return error(
            503,
            f"reload failed, still serving v{current.version if current else 'nothing'}: {exc}",
        )
    model = state.manager.current
    body = {"changed": changed, **(model.info() if model else {})}
    if state.shadow is not None:  # the shadow follows its alias now too (best effort)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(state.shadow.manager.refresh)
        body["shadow"] = state.shadow.info()
    return json_response(body)
