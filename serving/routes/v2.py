"""The Open Inference Protocol (V2: KServe, MLServer, Triton), so their clients
(`tritonclient`, KServe's SDK) and gateways can use this server.

One model, named like the registered model, with one input tensor `input` (FP32,
[-1, n_features]; INT and FP64 data are accepted and cast) and two outputs: `label` (INT64,
[-1]) and `probabilities` (FP32, [-1, n_classes]). Tensors come as JSON (flat or nested
`data`) or through the binary tensor extension (`Inference-Header-Content-Length`), and
go back the way the request asks (`binary_data` per output, `binary_data_output` for all).
Every row is logged like a `/predict` row: its id is the request's `parameters.ids[k]`,
else `{id}-{k}` from the request `id` (just `id` for one row), else generated; the ids
come back in the response's `parameters.ids`, for `/feedback`, joined with commas (so no
V2 row id may hold one).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from pipeline.store import StoreUnavailable
from serving.deps import StateDep, check_api_key
from serving.requests import BadRequest, checked_array, may_hold_booleans, parse_ids
from serving.responses import V2_PREFIX, error, json_response, store_unavailable
from serving.routes.predict import CLIENT_ID, score_body
from serving.runtime import LoadedModel

router = APIRouter(prefix=V2_PREFIX, tags=["open inference protocol (v2)"])
INPUT = "input"
OUTPUTS = ("label", "probabilities")
HEADER_LENGTH = "inference-header-content-length"
# V2 datatype -> numpy dtype, for the input tensor's raw bytes (little-endian)
DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}


def _error(status: int, message: str) -> Response:
    """V2's error shape is {"error": ...}; "detail" is this API's everywhere else."""
    return error(status, message, v2=True)


def _serving(state, name: str, version: str | None) -> LoadedModel | Response:
    model = state.manager.current
    if name != state.settings.model_name:
        return _error(
            404, f"unknown model {name!r}: this server serves {state.settings.model_name!r}"
        )
    if model is None:
        return _error(503, f"no model loaded ({state.manager.last_error or 'starting'})")
    if version is not None and version != model.version:
        return _error(404, f"{name} v{version} is not served here (v{model.version} is)")
    return model


@router.get("")
async def server_metadata(state: StateDep) -> Response:
    return json_response(
        {
            "name": "mlops-loop",
            "version": state.settings.model_name,
            "extensions": ["binary_tensor_data"],
        }
    )


@router.get("/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready")
async def ready(state: StateDep) -> Response:
    ok = state.manager.current is not None
    return json_response({"ready": ok}, 200 if ok else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(state: StateDep, name: str, version: str | None = None) -> Response:
    model = _serving(state, name, version)
    if isinstance(model, Response):
        return model
    cfg = model.predictor.cfg
    return json_response(
        {
            "name": name,
            "versions": [model.version],
            "platform": "pytorch",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, cfg.n_features]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, cfg.num_classes]},
            ],
            "parameters": {"feature_names": list(model.predictor.feature_names)},
        }
    )


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(state: StateDep, name: str, version: str | None = None) -> Response:
    model = _serving(state, name, version)
    if isinstance(model, Response):
        return (
            model
            if model.status_code == 404
            else json_response({"name": name, "ready": False}, 503)
        )
    return json_response({"name": name, "ready": True})


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request, state: StateDep, name: str, version: str | None = None
) -> Response:
    """Rows in one input tensor; label and probabilities out; every row logged."""
    try:  # checked here, not by the ApiKey dependency, whose 401 is in the API's own shape
        check_api_key(state.settings, request.headers)
    except BadRequest as exc:
        return _error(exc.status, exc.detail)
    return await infer_body(state, name, version, request.body, request.headers.get)


async def infer_body(state, name: str, version: str | None, read_body, header) -> Response:
    """The route's work, for the route and for serving.fastpath: `header(name)` reads a
    request header."""
    model = _serving(state, name, version)
    if isinstance(model, Response):
        return model
    call: dict = {}

    def parse(body: bytes, content_type: str | None, model: LoadedModel, max_rows: int):
        length = header(HEADER_LENGTH)
        rows, call["request"] = parse_infer(body, length, model.predictor.cfg.n_features, max_rows)
        # the outputs are checked here, before inference: rows are logged before the answer
        # is shaped, so a request refused for what it asks back must be refused by now
        call["outputs"] = wanted_outputs(call["request"])
        return rows, _ids(call["request"], len(rows))

    def shape(used: LoadedModel, ids, labels, probs, unusual) -> dict | Response:
        return infer_response(call["request"], call["outputs"], used, ids, labels, probs)

    try:
        return await score_body(
            state,
            read_body,
            header("content-type"),
            parse,
            shape,
            header(CLIENT_ID),
            routable=version is None,  # a request naming its version gets that version
        )
    except BadRequest as exc:
        return _error(exc.status, exc.detail)
    except StoreUnavailable as exc:
        return store_unavailable(exc, v2=True)


def parse_infer(
    body: bytes, header_length: str | None, n_features: int, max_rows: int
) -> tuple[np.ndarray, dict]:
    """The request JSON (and binary tensors after it) -> (rows, the request object)."""
    blob = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest(
                400, f"Inference-Header-Content-Length is not a number: {header_length!r}"
            ) from None
        if not 0 < size <= len(body):
            raise BadRequest(
                400, f"Inference-Header-Content-Length {size} does not fit a {len(body)}-byte body"
            )
        body, blob = body[:size], body[size:]
    if not body:
        raise BadRequest(400, "empty body: expected an inference request")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest(400, "an inference request is an object with a list of inputs")
    _parameters(payload, "parameters")
    inputs = payload["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(400, f"expected one input tensor {INPUT!r}, got {len(inputs)}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise BadRequest(400, f"unknown input {tensor.get('name')!r}: the input is {INPUT!r}")
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype not in DTYPES:
        raise BadRequest(400, f"datatype {datatype!r} is not numeric: one of {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise BadRequest(400, f"shape must be [rows, {n_features}], got {shape!r}")
    if shape[0] > max_rows:
        raise BadRequest(413, f"{shape[0]} rows in one request; the limit is {max_rows}")
    count = math.prod(shape)
    params = _parameters(tensor, "inputs[0].parameters")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
        if not isinstance(size, int) or size != count * dtype.itemsize or size != len(blob):
            raise BadRequest(
                400,
                f"binary_data_size {size!r}: {shape} {datatype} is "
                f"{count * dtype.itemsize} bytes, {len(blob)} came",
            )
        array = np.frombuffer(blob, dtype=dtype).reshape(shape)
    else:
        if blob:
            raise BadRequest(
                400,
                f"{len(blob)} bytes after the {len(body)}-byte JSON header, but no input "
                "is binary (its parameters need binary_data_size)",
            )
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(400, "the input needs data (a flat or nested list) or binary data")
        if may_hold_booleans(body) and _has_booleans(data):
            raise BadRequest(400, "input data must be numbers, found booleans")
        try:
            # NumPy's own reading of the values' type, not a cast to float64, which would
            # take "1" for 1.0 (checked_array refuses anything but numbers, as /predict does)
            array = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(
                400, "input data must be numbers in a flat or regular nested list"
            ) from None
        if array.size != count:
            raise BadRequest(400, f"shape {shape} needs {count} values, data holds {array.size}")
        array = array.reshape(shape)
    try:
        return checked_array(array, n_features, INPUT), payload
    except BadRequest as exc:  # V2 says 400 for a request that does not fit the model
        raise BadRequest(400, exc.detail) from None


def _has_booleans(data: list) -> bool:
    """true/false anywhere in flat or nested data (NumPy would take them as 1/0); map(type)
    keeps the scan in C."""
    if bool in map(type, data):
        return True
    return any(isinstance(row, list) and _has_booleans(row) for row in data)


def _parameters(holder: dict, where: str) -> dict:
    """`holder`'s V2 parameters: an object (absent or null: none). Anything else is
    refused here, before any key of it is looked up."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(400, f"{where} must be an object, got {type(params).__name__}")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(400, f"{where}.{key} must be true or false, got {type(value).__name__}")
    return value


def wanted_outputs(request: dict) -> list[tuple[str, bool]]:
    """The outputs the request asks for, as (name, binary), in its order; all of them when
    it names none (or an empty list). Everything about them is checked here, so that
    shaping the answer cannot fail."""
    all_binary = _flag(_parameters(request, "parameters"), "binary_data_output", "parameters")
    wanted = request.get("outputs")
    if wanted is None or wanted == []:
        return [(name, all_binary) for name in OUTPUTS]
    if not isinstance(wanted, list):
        raise BadRequest(
            400, f"outputs must be a list of {{name, parameters}}, got {type(wanted).__name__}"
        )
    outputs: list[tuple[str, bool]] = []
    for k, spec in enumerate(wanted):
        if not isinstance(spec, dict):
            raise BadRequest(400, f"outputs[{k}] must be an object with a name")
        name = spec.get("name")
        if not isinstance(name, str) or name not in OUTPUTS:
            raise BadRequest(400, f"unknown output {name!r}: label or probabilities")
        if any(name == seen for seen, _ in outputs):
            raise BadRequest(400, f"output {name!r} asked for twice")
        where = f"outputs[{k}].parameters"
        binary = _flag(_parameters(spec, where), "binary_data", where)
        outputs.append((name, all_binary or binary))
    return outputs


def _ids(request: dict, n: int) -> list[str]:
    """The rows' ids: `parameters.ids`, else made from the request `id`, else generated.
    The answer joins them with commas into one string (V2's parameter values are strings,
    numbers or booleans; tritonclient takes no list there), so an id holding a comma could
    not be split back from it: such an id is refused."""
    params = _parameters(request, "parameters")
    ids: Any = params.get("ids")
    made = False  # made from the request id, not sent as such
    if isinstance(ids, str):
        ids = ids.split(",")
    if ids is None and isinstance(request.get("id"), str) and request["id"]:
        ids = [request["id"]] if n == 1 else [f"{request['id']}-{k}" for k in range(n)]
        made = True
    if ids is None:
        return parse_ids(None, n)
    try:
        ids = parse_ids(ids, n)
    except BadRequest as exc:
        if made:
            raise BadRequest(
                400,
                f"the request id makes row ids that are not valid ({exc.detail}); "
                "send parameters.ids instead",
            ) from None
        raise BadRequest(400, exc.detail.replace("ids", "parameters.ids", 1)) from None
    comma = next((k for k, value in enumerate(ids) if "," in value), None)
    if comma is not None:
        where = "the request id" if made else f"parameters.ids[{comma}]"
        raise BadRequest(
            400,
            f"{where} holds a comma: the answer's parameters.ids joins the row ids with "
            "commas, so a V2 row id cannot hold one",
        )
    return ids


def infer_response(
    request: dict, wanted: list[tuple[str, bool]], used: LoadedModel, ids, labels, probs
) -> Response:
    """The `wanted` outputs (from `wanted_outputs`), each JSON or binary."""
    tensors = {
        "label": ("INT64", np.asarray(labels, dtype=np.int64)),
        "probabilities": ("FP32", np.asarray(probs, dtype=np.float32)),
    }
    outputs, blobs = [], []
    for name, binary in wanted:
        datatype, array = tensors[name]
        out: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    body = {
        "model_name": used.name,
        "model_version": used.version,
        "outputs": outputs,
        "parameters": {"ids": ",".join(ids)},
    }
    if "id" in request:
        body["id"] = request["id"]
    head = orjson.dumps(body)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
