"""The Open Inference Protocol (KServe v2, as Triton speaks it), with the binary tensor data
extension: health, server and model metadata, ``POST /v2/models/{name}[/versions/{v}]/infer``."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

import lma
from service.decoding import decode_v2, fill_v2, split_binary, v2_to_arrays
from service.errors import RequestError
from service.registry import LoadedModel
from service.routers.common import (
    JSON,
    body_of,
    feature_store_status,
    inline_schema,
    json_response,
)
from service.state import State, deadline, resolve, score, sigmoid

router = APIRouter(tags=["v2 (Open Inference Protocol)"])

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="timeout_ms; binary_data_output; entities (one entity for every row, "
        "e.g. {\"device_id\": \"a99f214a\"}) and entity_inputs (names of input tensors whose "
        "values are each row's entity): their stored features fill the fields not sent")
    inputs: list[Tensor] = Field(description="'dense' FP32 [B, n_dense] and 'tokens' INT64 "
                                 "[B, S], or one tensor per feature field")
    outputs: list[dict[str, Any]] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[Tensor]


_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(InferRequest)}},
    }
}


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "lma-ctr", "version": lma.__version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", summary="Readiness: every model loaded and warmed")
async def ready(state: State) -> Response:
    reg = state.registry
    # Readiness is the models' alone: Redis is shared by every replica, so failing them all at
    # once for it would stop the requests that carry their features too. The details say it.
    fs = await feature_store_status(state, probe=True)
    if reg.ready:
        return json_response({"ready": True, "feature_store": fs})
    body: dict[str, Any] = {"ready": False,
                            "loaded": [f"{m.name}/{m.version}" for m in reg.all()],
                            "expected": [f"{s.name}/{s.version}" for s in reg.sources],
                            "feature_store": fs}
    if reg.error:
        body["error"] = reg.error
    return json_response(body, status=503, headers={"Retry-After": "1"})


def _metadata(state: State, m: LoadedModel) -> dict[str, Any]:
    return {
        "name": m.name,
        "versions": state.registry.versions(m.name),
        "platform": f"lma_{m.backend.name}",
        "inputs": [
            {"name": "dense", "datatype": "FP32", "shape": [-1, m.n_dense]},
            {"name": "tokens", "datatype": "INT64", "shape": [-1, m.n_slots]},
        ],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "logits", "datatype": "FP32", "shape": [-1]},
        ],
        "parameters": {
            "raw_feature_inputs": {
                "dense": m.schema.dense_names,
                "categorical": m.schema.categorical_names,
                "note": "instead of dense/tokens: one [B] tensor per field (BYTES or numeric)",
            }
        },
    }


@router.get("/v2/models/{name}", summary="Model metadata")
async def model_metadata(name: str, state: State) -> Response:
    return json_response(_metadata(state, resolve(state, name)))


@router.get("/v2/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, state: State) -> Response:
    return json_response(_metadata(state, resolve(state, name, version)))


def _ready(state: State, name: str, version: str | None) -> Response:
    m = resolve(state, name, version)
    return json_response({"name": m.name, "ready": m.ready}, status=200 if m.ready else 503)


@router.get("/v2/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, state: State) -> Response:
    return _ready(state, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, state: State) -> Response:
    return _ready(state, name, version)


async def _infer(request: Request, state: State, name: str, version: str | None) -> Response:
    model = resolve(state, name, version)
    with model.hold():
        return await _infer_on(model, request, state)


async def _infer_on(model: LoadedModel, request: Request, state: State) -> Response:
    body = await body_of(request, state, (JSON, "application/octet-stream"))
    header, tail = split_binary(body, request.headers.get(HEADER_LENGTH))
    s = state.settings
    req = decode_v2(header, tail, s.max_rows, s.max_string_bytes)
    until = deadline(state, request.headers, req.timeout_ms)
    warnings: list[str] = []
    if req.entities is not None or req.entity_inputs:
        if state.feature_source is None:
            raise RequestError(422, "parameters.entities / entity_inputs need a feature store, "
                               "and none is configured (REDIS_URL is not set): send the "
                               "features inline", field="parameters.entities",
                               kind="no_feature_store")
        warnings = await fill_v2(state.feature_source, model.schema, req, until)
    dense, tokens = v2_to_arrays(req, model.encoder, s.ignore_unknown)
    logits = await score(state, model, dense, tokens, until)
    values = {"logits": logits.astype(np.float32),
              "probability": sigmoid(logits).astype(np.float32)}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out_name in req.outputs:
        arr = values[out_name]
        t: dict[str, Any] = {"name": out_name, "datatype": "FP32", "shape": [len(arr)]}
        if out_name in req.binary_outputs:
            raw = arr.astype("<f4").tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr
        outputs.append(t)
    resp: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                            "outputs": outputs}
    if req.id is not None:
        resp["id"] = req.id
    if warnings:
        resp["parameters"] = {"warnings": warnings}
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(head, media_type=JSON)
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


@router.post("/v2/models/{name}/infer", response_model=InferResponse, openapi_extra=_BODY,
             summary="Inference (JSON, or binary tensors with Inference-Header-Content-Length)")
async def infer(name: str, request: Request, state: State) -> Response:
    return await _infer(request, state, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferResponse,
             openapi_extra=_BODY, summary="Inference on one version of the model")
async def infer_version(name: str, version: str, request: Request, state: State) -> Response:
    return await _infer(request, state, name, version)
