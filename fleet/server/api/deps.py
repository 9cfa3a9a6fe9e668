"""FastAPI dependencies every router shares: the server context and the caller's role.

``reader`` admits any valid token (and anonymous callers when
``auth.anonymous_read``); ``operator`` admits operator tokens only. Routers take
them as ``actor: Operator`` (``Annotated`` aliases below), the context as ``ctx: Ctx``.

The token comes from the ``Authorization: Bearer`` header or, for the dashboard, from
its login cookie. A browser sends a cookie with any request, whichever site made it,
so a write authenticated by the cookie must come from a page of this server: its
``Origin`` (or ``Referer``) must name this host, or it is refused (CSRF).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, status

from ..auth import Actor, actor_for
from ..context import ServerContext

ANONYMOUS = Actor("anonymous", "read")
# The dashboard's login cookie (set by fleet.server.web.auth): the token itself.
COOKIE = "edge_fleet_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.context
    return ctx


Ctx = Annotated[ServerContext, Depends(context)]


def same_origin(request: Request) -> bool:
    """The request names this server as the page it comes from (Origin, else Referer)."""
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    parts = urlsplit(source)
    host = request.headers.get("host", "")
    return bool(parts.scheme in ("http", "https") and host and parts.netloc == host)


def cookie_actor(request: Request, ctx: ServerContext) -> Actor | None:
    """The actor of the login cookie, or None (no cookie, or an unknown or revoked token).

    Raises 403 for a write that does not come from this server's pages."""
    token = request.cookies.get(COOKIE, "").strip()
    if not token:
        return None
    with ctx.database.session() as s:
        actor = actor_for(s, token)
    if actor is not None and request.method not in SAFE_METHODS and not same_origin(request):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "a write with the login cookie must come from this server's pages "
            "(Origin or Referer of this host)",
        )
    return actor


def reader(request: Request, ctx: Ctx) -> Actor:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header and COOKIE in request.cookies:
        cookie = cookie_actor(request, ctx)
        if cookie is not None:
            return cookie
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown or revoked token")
    if not header:
        if ctx.config.auth.anonymous_read:
            return ANONYMOUS
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with ctx.database.session() as s:
        actor = actor_for(s, token.strip())
    if actor is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown or revoked token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return actor


Reader = Annotated[Actor, Depends(reader)]


def operator(actor: Reader) -> Actor:
    if not actor.can_write:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"token {actor.name!r} is read-only: this needs operator"
        )
    return actor


Operator = Annotated[Actor, Depends(operator)]
