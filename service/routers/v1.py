"""KServe v1 / TF Serving form: ``POST /v1/models/{name}:predict`` with instances, or the
ranking form (context + candidates + top_k); model listing and metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.decoding import decode_v1, parse_json, rows_to_arrays, top_k_of
from service.errors import RequestError
from service.registry import LoadedModel
from service.routers.common import body_of, feature_store_status, inline_schema, json_response
from service.state import State, deadline, resolve, score, sigmoid

router = APIRouter(tags=["v1 (KServe v1 / TF Serving)"])

Value = str | float | int | list[str | float | int] | None


class PredictRequest(BaseModel):
    """Either ``instances``, or ``candidates`` with an optional ``context`` and ``top_k``."""

    model_config = ConfigDict(extra="forbid")

    instances: list[dict[str, Value]] | None = Field(
        None, description="rows of raw feature values keyed by field name",
        examples=[[{"I1": 3, "I2": 20, "C1": "68fd1e64", "C2": "80e26c9b"}]])
    context: dict[str, Value] | None = Field(
        None, description="ranking form: fields shared by every candidate (candidates win)")
    candidates: list[dict[str, Value]] | None = Field(
        None, description="ranking form: one row per candidate")
    top_k: int | None = Field(None, ge=1, description="ranking form: also list the best K")
    entities: dict[str, str | int] | None = Field(
        None, description="entity ids whose stored features fill the fields no row carries "
        "(feature store), e.g. {\"device_id\": \"a99f214a\"}; several fields make one "
        "compound key. A row (instance or candidate) may hold its own under the reserved key "
        "\"entities\"; its stored fields go under the row's values and over the request's")


class TopK(BaseModel):
    indices: list[int]
    scores: list[float]


class PredictResponse(BaseModel):
    predictions: list[float] = Field(description="click probabilities, in input order")
    model: str
    version: str
    top_k: TopK | None = None
    warnings: list[str] | None = Field(
        None, description="e.g. the feature store could not answer, or holds nothing for an "
        "entity: the rows were scored with their own values")


_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(PredictRequest)}},
    }
}


async def _predict(request: Request, state: State, name: str, version: str | None) -> Response:
    model = resolve(state, name, version)
    with model.hold():
        return await _predict_on(model, request, state)


async def _predict_on(model: LoadedModel, request: Request, state: State) -> Response:
    body = await body_of(request, state)
    req = decode_v1(parse_json(body), state.settings.max_rows)
    until = deadline(state, request.headers)
    s = state.settings
    warnings: list[str] = []
    if req.entities is not None or req.row_entities is not None:
        if state.feature_source is None:
            raise RequestError(422, "'entities' needs a feature store, and none is configured "
                               "(REDIS_URL is not set): send the features inline",
                               field="entities", kind="no_feature_store")
        warnings += await state.feature_source.fill(model.schema, req.rows, req.entities,
                                                    req.row_entities, until=until)
    dense, tokens = rows_to_arrays(model.encoder, req.rows, req.where, s.ignore_unknown)
    probs = sigmoid(await score(state, model, dense, tokens, until))
    out: dict[str, Any] = {"predictions": probs, "model": model.name, "version": model.version}
    if req.top_k is not None:
        out["top_k"] = top_k_of(probs, req.top_k)
    if warnings:
        out["warnings"] = warnings
    return json_response(out)


@router.post("/v1/models/{name}:predict", response_model=PredictResponse, openapi_extra=_BODY,
             summary="Click probabilities of rows (instances) or of ranking candidates")
async def predict(name: str, request: Request, state: State) -> Response:
    return await _predict(request, state, name, None)


@router.post("/v1/models/{name}/versions/{version}:predict", response_model=PredictResponse,
             openapi_extra=_BODY, summary="The same, for one version of the model")
async def predict_version(name: str, version: str, request: Request, state: State) -> Response:
    return await _predict(request, state, name, version)


@router.get("/v1/models", summary="Every model and version this server holds")
async def list_models(state: State) -> Response:
    return json_response({"models": [m.describe() for m in state.registry.all()],
                          "feature_store": await feature_store_status(state)})


@router.get("/v1/models/{name}", summary="A model's newest version: kind, bytes, placement")
async def model_info(name: str, state: State) -> Response:
    m = resolve(state, name)
    return json_response({**m.describe(), "versions": state.registry.versions(name),
                          "feature_store": await feature_store_status(state)})


@router.get("/v1/models/{name}/versions/{version}", summary="One version of a model")
async def model_version_info(name: str, version: str, state: State) -> Response:
    return json_response(resolve(state, name, version).describe())
