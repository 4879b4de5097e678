"""The HTTP API's request and response bodies, as pydantic models.

They document the API (`/openapi.json`, `/docs`); they are not on the request path. Bodies
are parsed by `serving.requests` (orjson straight into numpy, no pydantic) and answered by
`serving.responses`, so a model here and the code there must say the same thing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

Row = list[float]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are refused (422)


# --- predict ---------------------------------------------------------------------------------


class PredictionRequest(_Request):
    instances: list[Row] = Field(
        description="rows of raw features, each as long as the model's input (MLOPS_MAX_ROWS_"
        "PER_REQUEST rows at most)"
    )
    ids: list[str] | None = Field(
        default=None,
        description="one client id per row (1-128 printable ASCII, no spaces, unique); a "
        "retried id is never logged twice. Omitted: generated",
    )


class Prediction(BaseModel):
    id: str
    label: int
    probabilities: list[float]
    out_of_range: bool | None = Field(
        default=None,
        description="present (true) when the row is unlike the model's training data "
        "(MLOPS_OUT_OF_RANGE=flag); the X-Out-Of-Range header counts such rows",
    )


class PredictionResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="also in the X-Model-Version header")
    predictions: list[Prediction]


class DataframeSplit(BaseModel):
    columns: list[str] | None = None
    data: list[Row]


class InvocationsRequest(_Request):
    """MLflow's scoring protocol: exactly one of the four inputs."""

    dataframe_split: DataframeSplit | None = None
    dataframe_records: list[dict[str, float]] | None = None
    instances: list[Row] | dict[str, list[float]] | None = None
    inputs: list[Row] | dict[str, list[float]] | None = None
    params: dict[str, Any] | None = Field(default=None, description="accepted and ignored")


class InvocationsResponse(BaseModel):
    predictions: list[dict[str, float]] = Field(
        description="one record per row: `label` and `prob_0` .. `prob_{K-1}`"
    )


# --- feedback --------------------------------------------------------------------------------


class FeedbackLabel(_Request):
    id: str = Field(description="the id a prediction was answered with")
    label: int = Field(ge=0, description="the true class")


class FeedbackRequest(_Request):
    labels: list[FeedbackLabel]
    overwrite: bool = Field(default=False, description="replace labels already given")


class FeedbackResult(BaseModel):
    id: str | None
    status: str = Field(
        description="labelled | unchanged | overwritten | conflict | unknown_id | invalid | "
        "invalid_label"
    )
    detail: str | None = None
    index: int | None = Field(default=None, description="position in the request (invalid rows)")


class FeedbackResponse(BaseModel):
    results: list[FeedbackResult]
    counts: dict[str, int] = Field(description="rows per status")


class FeedbackConflict(FeedbackResponse):
    detail: str


# --- ops and admin ---------------------------------------------------------------------------


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    detail: str | None = None


class ModelInfo(BaseModel):
    model_name: str
    model_version: str | None
    run_id: str | None = None
    data_hash: str | None = None
    loaded_at: str | None = None
    n_features: int | None = None
    num_classes: int | None = None
    last_load_error: str | None = None
    log_mode: str | None = None
    shadow: dict | None = None  # the shadow version, its share and its row counts
    canary: dict | None = None  # the running canary: candidate, champion, share


class ReloadResponse(ModelInfo):
    changed: bool


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, in words")


# --- OpenAPI helpers -------------------------------------------------------------------------

REQUEST_MODELS = (PredictionRequest, InvocationsRequest, FeedbackRequest)
_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel], csv: bool = False) -> dict:
    """`openapi_extra` of a route that reads its own body: documents `model` as that body
    (and, with `csv`, a text/csv body with a header row of column names)."""
    content: dict = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    if csv:
        content["text/csv"] = {
            "schema": {"type": "string", "description": "a header row of column names, then rows"}
        }
    return {"requestBody": {"required": True, "content": content}}


def responses(ok: type[BaseModel], *errors: int) -> dict[int | str, dict]:
    """`responses=` of a route: its 200 body and the error statuses it can answer."""
    return {200: {"model": ok}} | {status: {"model": ErrorResponse} for status in errors}


def request_schemas() -> dict[str, dict]:
    """components.schemas entries for the request bodies (and the models they nest)."""
    _, top = models_json_schema([(m, "validation") for m in REQUEST_MODELS], ref_template=_REF)
    return top["$defs"]
