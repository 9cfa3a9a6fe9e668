"""Rendering the dashboard's templates: one Jinja2 environment, filters for times and
figures, and the context every page has (who is logged in, the clock)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from ..auth import Actor

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def ago(ts: float | None, now: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``; ``never`` for None."""
    if ts is None:
        return "never"
    seconds = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def when(ts: float | None) -> str:
    """A time in UTC, to the second (the server's log and the CLI use UTC too)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


templates.env.filters["when"] = when
templates.env.filters["figure"] = figure
templates.env.globals["ago"] = ago


def render(
    request: Request, name: str, actor: Actor, status_code: int = 200, **context: Any
) -> HTMLResponse:
    now = request.app.state.context.clock()
    return templates.TemplateResponse(
        request,
        name,
        {"actor": actor, "can_write": actor.can_write, "now": now, **context},
        status_code=status_code,
    )


def not_found(request: Request, actor: Actor, exc: HTTPException) -> HTMLResponse:
    """A page for a device or rollout that is not there (the API's one-line detail)."""
    return render(request, "error.html", actor, status_code=exc.status_code, error=exc.detail)
