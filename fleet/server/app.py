"""The fleet server's HTTP API: one FastAPI app over a ``ServerContext``.

FastAPI for its pydantic 2 models (the rest of the project's wire and config types)
and the OpenAPI document it generates from them, served at ``/openapi.json``. The
Swagger and ReDoc pages are off: they load their assets from a CDN, and the server
must work on a site with no Internet access.

Every 4xx body is ``{"detail": "<one line>"}`` naming the field or the cause, so
the CLI (``fleet.client``) can show it as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.protocol import validation_problems

from . import web
from .api import artifacts, bundles, commands, devices, events, health, rollouts
from .context import ServerContext
from .db import DatabaseError

log = logging.getLogger(__name__)


def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(
        title="edge-fleet server",
        summary="Desired state, rollouts, inventory and history of an edge-deploy fleet.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.context = ctx
    # Set when the server stops: long-lived responses (the dashboard's event stream)
    # end on it, since uvicorn waits for every open response before it exits.
    app.state.stopping = threading.Event()
    app.state.metrics = health.metrics_registry(ctx)
    for module in (devices, bundles, artifacts, commands, events, health, rollouts):
        app.include_router(module.router)
    # The dashboard: every other path (pages, /ui/*), and its assets under /static.
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DatabaseError, _database_error)
    app.add_exception_handler(OperationalError, _database_error)
    return app


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def request_problems(exc: RequestValidationError) -> str:
    """``body.version: String should match pattern ...; query.limit: ...``.

    FastAPI's error list has the shape of a pydantic ``ValidationError``'s, so the
    agent's one formatter names the key path (union tags dropped) as everywhere else.
    """
    body = exc.body if isinstance(exc.body, Mapping) else None
    problems = validation_problems(cast(ValidationError, exc), {"body": body})
    return one_line("; ".join(f"{loc}: {msg}" for loc, msg in problems)) or "invalid request"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": request_problems(exc)}, status_code=422)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(
        {"detail": one_line(detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # A database that does not answer is the server's trouble, not the caller's: 503,
    # with the cause in one line (OperationalError's text spans several).
    cause = exc.orig if isinstance(exc, OperationalError) else exc
    log.error("database: %s", cause)
    return JSONResponse({"detail": f"database unavailable: {one_line(str(cause))}"}, 503)
