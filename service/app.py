"""The FastAPI application: routers, error handlers, request metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import lma
from service.errors import RequestError
from service.routers import admin, ops, v1, v2
from service.routers.common import json_response
from service.state import AppState

logger = logging.getLogger(__name__)

def create_app(lifespan: Any = None) -> FastAPI:
    app = FastAPI(
        title="LMA-CTR prediction service",
        version=lma.__version__,
        description="Click probabilities from exported LMA/DLRM bundles: KServe v1 / TF Serving "
                    "form, ranking form, and the Open Inference Protocol (KServe v2).",
        lifespan=lifespan,
    )
    # The routers' routes go onto the app itself (they have no prefix or dependencies of their
    # own), so app.routes lists every route: FastAPI 0.163's include_router would nest them in
    # lazily resolved sub-routers that tools inspecting the app (and the probes' test) do not see.
    for router in (v1.router, v2.router, admin.router, ops.router):
        app.router.routes.extend(router.routes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Any:
        _count(request, exc.kind, exc.status)
        return json_response(exc.body(), status=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        _count(request, "validation", 422)
        return json_response({"error": f"{loc}: {first.get('msg', 'invalid')}", "field": loc},
                             status=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        _count(request, "http", exc.status_code)
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path} ({msg})"
        return json_response({"error": msg}, status=exc.status_code,
                             headers=getattr(exc, "headers", None))

    app.add_middleware(RequestMetrics)
    return app


def _count(request: Request, kind: str, status: int) -> None:
    st: AppState | None = getattr(request.app.state, "lma", None)
    if st is not None:
        st.metrics.errors.labels(kind, str(status)).inc()


class RequestMetrics:
    """Latency of every request by route template, model and status; turns an unexpected
    exception into a JSON 500 (logged and counted) rather than a dropped connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_wrapped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            st = getattr(scope["app"].state, "lma", None)
            if st is not None:
                st.metrics.errors.labels("internal", "500").inc()
            if not started:
                resp = json_response({"error": "internal server error (logged)"}, status=500)
                await resp(scope, receive, send)
            status = 500
        st = getattr(scope["app"].state, "lma", None)
        if st is not None:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            model = (scope.get("path_params") or {}).get("name", "")
            if not isinstance(model, str) or model not in st.registry.names():
                model = "" if not model else "unknown"
            st.metrics.request_seconds.labels(path, model, str(status)).observe(
                time.perf_counter() - t0)
