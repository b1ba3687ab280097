"""Admin routes: hot reload (``POST /v1/models/{name}/reload``) and the v2 model repository
extension's load and unload. Off unless ``LMA_ADMIN_TOKEN`` is set; then each needs
``Authorization: Bearer <token>``.

``?broadcast=true`` on reload and load also publishes the reload on ``LMA_SERVE_RELOAD_CHANNEL``
(before reloading here), so every replica subscribed to it reloads too; the answer's
``broadcast`` says on which channel and how many subscribers received it."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from service.errors import RequestError
from service.reload import broadcast as publish_reload
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


_BROADCAST = Query(False, description="also publish the reload on LMA_SERVE_RELOAD_CHANNEL, so "
                   "every replica subscribed to it reloads")


async def _reload(state: State, name: str, to_all: bool) -> Response:
    sent = await publish_reload(state, name) if to_all else None
    status, answer = await reload_model(state, name)
    if sent is not None:
        answer["broadcast"] = sent
    return json_response(answer, status=status)


@router.post("/v1/models/{name}/reload", dependencies=_ADMIN,
             summary="Load the model's newest version folder, warm it, swap it in, retire the old")
async def reload(name: str, state: State, broadcast: bool = _BROADCAST) -> Response:
    return await _reload(state, name, broadcast)


@router.post("/v2/repository/models/{name}/load", dependencies=_ADMIN,
             summary="The same as the v1 reload (model repository extension)")
async def load(name: str, state: State, broadcast: bool = _BROADCAST) -> Response:
    return await _reload(state, name, broadcast)


@router.post("/v2/repository/models/{name}/unload", dependencies=_ADMIN,
             summary="Unload every version of the model after its in-flight requests")
async def unload(name: str, state: State) -> Response:
    return json_response(await unload_model(state, name))
