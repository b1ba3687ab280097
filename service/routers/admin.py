"""Admin routes: hot reload (``POST /v1/models/{name}/reload``) and the v2 model repository
extension's load and unload. Off unless ``LMA_ADMIN_TOKEN`` is set; then each needs
``Authorization: Bearer <token>``."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.errors import RequestError
from service.reload import reload_model, unload_model
from service.routers.common import json_response
from service.state import State


def require_admin(request: Request, state: State) -> None:
    token = state.settings.admin_token
    secret = token.get_secret_value() if token is not None else ""
    if not secret:
        raise RequestError(404, "admin routes are off: set LMA_ADMIN_TOKEN on the server to "
                           "enable reload, load and unload", kind="admin_off")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "admin route: send 'Authorization: Bearer <LMA_ADMIN_TOKEN>'",
                           field="Authorization", kind="unauthorized",
                           headers={"WWW-Authenticate": "Bearer"})
    # Constant time: the answer's timing says nothing about how much of the token matched.
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise RequestError(403, "admin route: wrong bearer token", field="Authorization",
                           kind="forbidden")


# On each route rather than the router: the app copies the routes themselves (see create_app).
router = APIRouter(tags=["admin (LMA_ADMIN_TOKEN)"])
_ADMIN = [Depends(require_admin)]


@router.post("/v1/models/{name}/reload", dependencies=_ADMIN,
             summary="Load the model's newest version folder, warm it, swap it in, retire the old")
async def reload(name: str, state: State) -> Response:
    status, answer = await reload_model(state, name)
    return json_response(answer, status=status)


@router.post("/v2/repository/models/{name}/load", dependencies=_ADMIN,
             summary="The same as the v1 reload (model repository extension)")
async def load(name: str, state: State) -> Response:
    status, answer = await reload_model(state, name)
    return json_response(answer, status=status)


@router.post("/v2/repository/models/{name}/unload", dependencies=_ADMIN,
             summary="Unload every version of the model after its in-flight requests")
async def unload(name: str, state: State) -> Response:
    return json_response(await unload_model(state, name))
