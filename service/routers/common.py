"""Reading and answering bodies, shared by the protocol routers."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from service.decoding import read_body
from service.errors import RequestError
from service.state import AppState

JSON = "application/json"


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, for a route's ``openapi_extra`` (where
    ``#/$defs/...`` references would not resolve)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


async def feature_store_status(state: AppState, probe: bool = False) -> dict[str, Any]:
    """The feature store in readiness details: configured or not, reachable, last error."""
    from service.feature_store import no_store_status

    if state.feature_source is None:
        return no_store_status()
    return await state.feature_source.status(probe)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type=JSON, headers=headers)


def check_content_type(request: Request, allowed: tuple[str, ...]) -> None:
    ct = request.headers.get("content-type")
    if ct is None:
        return
    base = ct.split(";", 1)[0].strip().lower()
    if base in allowed or base.endswith("+json"):
        return
    raise RequestError(415, f"Content-Type {ct!r} is not accepted here; send "
                       f"{' or '.join(allowed)}", field="Content-Type", kind="content_type")


async def body_of(request: Request, state: AppState, allowed: tuple[str, ...] = (JSON,)) -> bytes:
    check_content_type(request, allowed)
    if request.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise RequestError(415, "compressed request bodies are not accepted "
                           f"(Content-Encoding {request.headers['content-encoding']!r})",
                           field="Content-Encoding", kind="content_type")
    try:
        return await read_body(request.stream(), request.headers.get("content-length"),
                               state.settings.max_body_bytes)
    except ClientDisconnect:
        # Nobody reads this answer; it is counted, and the request costs nothing more.
        raise RequestError(400, "the client disconnected before sending the whole body",
                           kind="client_disconnected") from None
