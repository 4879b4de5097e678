"""Feedback: ground-truth labels for logged predictions, joined by id."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.deps import ApiKey, StateDep
from serving.requests import parse_json, parse_labels
from serving.responses import json_response
from serving.schemas import (
    FeedbackConflict,
    FeedbackRequest,
    FeedbackResponse,
    json_body,
    responses,
)

router = APIRouter(tags=["feedback"], dependencies=[ApiKey])


def _add_labels(state, labels, overwrite):
    """The store's tables are brought up to date at start-up, or by the first commit when
    the store was down then; a label can come first (a log from an older release lacks
    label_history), so it does the same."""
    if not state.writer.schema_ready:
        state.store.create()
        state.writer.schema_ready = True
    return state.store.add_labels(labels, overwrite)


@router.post(
    "/feedback",
    openapi_extra=json_body(FeedbackRequest),
    responses=responses(FeedbackResponse, 400, 401, 413, 415, 422)
    | {409: {"model": FeedbackConflict}},
)
async def feedback(request: Request, state: StateDep) -> Response:
    """Ground-truth labels for logged predictions, joined by id."""
    payload = parse_json(await request.body(), request.headers.get("content-type"))
    # each label is checked against the classes of the model that made its prediction
    # (the store reads them from the logged row), not against the model served now
    valid, errors, overwrite = parse_labels(payload, state.settings.max_rows_per_request)
    outcomes = await asyncio.to_thread(_add_labels, state, valid, overwrite) if valid else []
    results = [{"id": o.id, "status": o.status, "detail": o.detail} for o in outcomes]
    results += errors
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if counts.get("conflict"):
        return json_response(
            {
                "detail": "some ids already carry a different label; nothing "
                "was applied (send overwrite=true to replace them)",
                "results": results,
                "counts": counts,
            },
            409,
        )
    return json_response({"results": results, "counts": counts})
