"""Logging in to the dashboard: the token goes into an HttpOnly cookie, checked on
every page like the API's bearer header (``fleet.server.api.deps``).

Pages depend on ``PageActor``: without a valid cookie a browser is sent to
``/login`` (an htmx request is told so with ``HX-Redirect``, since a redirect would
swap the login page into a fragment).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response

from ..api.deps import ANONYMOUS, COOKIE, Ctx, cookie_actor, same_origin
from ..auth import Actor, actor_for
from ..context import ServerContext
from .render import templates

router = APIRouter()


class LoginRequired(HTTPException):
    def __init__(self, request: Request) -> None:
        if request.headers.get("hx-request"):
            super().__init__(status.HTTP_401_UNAUTHORIZED, "log in", {"HX-Redirect": "/login"})
        else:
            super().__init__(status.HTTP_303_SEE_OTHER, "log in", {"Location": "/login"})


def page_actor(request: Request, ctx: Ctx) -> Actor:
    actor = cookie_actor(request, ctx)
    if actor is not None:
        return actor
    if ctx.config.auth.anonymous_read and COOKIE not in request.cookies:
        return ANONYMOUS
    raise LoginRequired(request)


def page_operator(actor: Annotated[Actor, Depends(page_actor)]) -> Actor:
    if not actor.can_write:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"token {actor.name!r} is read-only: this needs operator"
        )
    return actor


PageActor = Annotated[Actor, Depends(page_actor)]
PageOperator = Annotated[Actor, Depends(page_operator)]


def _login_form(request: Request, error: str | None, status_code: int = 200) -> Response:
    return templates.TemplateResponse(
        request, "login.html", {"error": error}, status_code=status_code
    )


@router.get("/login")
def login_page(request: Request) -> Response:
    return _login_form(request, None)


@router.post("/login")
def login(request: Request, ctx: Ctx, token: Annotated[str, Form(max_length=256)] = "") -> Response:
    if not same_origin(request):
        return _login_form(request, "this form must be sent from this server's page", 403)
    actor = _check(ctx, token.strip())
    if actor is None:
        return _login_form(request, "unknown or revoked token", 401)
    response = RedirectResponse("/", status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE,
        token.strip(),
        httponly=True,
        samesite="strict",
        path="/",
        secure=request.url.scheme == "https",
    )
    return response


def _check(ctx: ServerContext, token: str) -> Actor | None:
    if not token:
        return None
    with ctx.database.session() as s:
        return actor_for(s, token)


@router.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    if same_origin(request):
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
