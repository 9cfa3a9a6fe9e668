"""The dashboard: server-rendered pages (Jinja2), htmx for actions and live fragments,
uPlot for charts; every asset is served from the package (no CDN, no build step).

``router`` has every page and ``/ui/*`` endpoint; ``static_files()`` is mounted at
``/static`` by ``fleet.server.app``.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.staticfiles import StaticFiles

from . import audit, auth, devices, live, models, overview, rollouts
from .render import HERE

router = APIRouter(include_in_schema=False)
for _module in (auth, overview, devices, rollouts, models, audit, live):
    router.include_router(_module.router)


def static_files() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")


__all__ = ["router", "static_files"]
