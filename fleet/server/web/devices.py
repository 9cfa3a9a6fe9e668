"""The device list (the API's query, paged for a browser) and one device's page with
its charts, history and actions."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from sqlalchemy import select

from agent.protocol import format_validation_error

from ..api.commands import CommandRequest, send_commands
from ..api.deps import Ctx
from ..api.devices import SORTS, STATUSES, DeviceFilter, device_history, device_page, get_device
from ..auth import Actor
from ..db.schema import DeviceGroup
from .auth import PageActor, PageOperator
from .render import not_found, render
from .sparkline import fps_points

router = APIRouter()

PER_PAGE = 50
MAX_PER_PAGE = 500
SORT_LABELS = {
    "id": "id",
    "-last_seen": "last seen, newest",
    "last_seen": "last seen, oldest",
    "-fps": "fps, highest",
    "fps": "fps, lowest",
    "-invoke_p95_ms": "p95 invoke, slowest",
    "invoke_p95_ms": "p95 invoke, fastest",
    "status": "status",
}
RANGES = {"1h": (3600, 60), "6h": (6 * 3600, 60), "24h": (86400, 300), "7d": (7 * 86400, 1800)}


def _blank(value: str | None) -> str | None:
    return value.strip()[:128] or None if value else None


def _list_data(ctx: Ctx, request: Request) -> dict[str, Any]:
    q = request.query_params
    status = q.get("status") if q.get("status") in STATUSES else None
    sort = q.get("sort") if q.get("sort") in SORTS else "id"
    f = DeviceFilter(
        group=_blank(q.get("group")),
        model=_blank(q.get("model")),
        version=_blank(q.get("version")),
        status=status,
        q=(_blank(q.get("q")) or "")[:64] or None,
        sort=sort or "id",
    )
    per_page = _int(q.get("per_page"), PER_PAGE, 1, MAX_PER_PAGE)
    page = _int(q.get("page"), 1, 1, 10**9)
    result = device_page(ctx, f, per_page, (page - 1) * per_page)
    pages = max(1, math.ceil(result.total / per_page))
    with ctx.database.session() as s:
        sparks = fps_points(s, [d.id for d in result.devices], ctx.clock())
        groups = list(s.scalars(select(DeviceGroup.group).distinct().order_by(DeviceGroup.group)))
    filters = {
        k: v
        for k, v in (
            ("group", f.group),
            ("model", f.model),
            ("version", f.version),
            ("status", f.status),
            ("q", f.q),
            ("sort", None if f.sort == "id" else f.sort),
            ("per_page", None if per_page == PER_PAGE else str(per_page)),
        )
        if v
    }

    def link(n: int) -> str:
        return "/devices?" + urlencode({**filters, "page": n})

    return {
        "filter": f,
        "groups": groups,
        "sorts": SORT_LABELS,
        "statuses": STATUSES,
        "result": result,
        "sparks": sparks,
        "page": page,
        "pages": pages,
        "prev_link": link(page - 1) if page > 1 else None,
        "next_link": link(page + 1) if page < pages else None,
        "fragment_url": "/ui/fragments/devices?" + urlencode({**filters, "page": page}),
    }


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(text or default)))
    except ValueError:
        return default


@router.get("/devices", response_class=HTMLResponse)
def devices_page(request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "devices.html", actor, **_list_data(ctx, request))


@router.get("/ui/fragments/devices", response_class=HTMLResponse)
def devices_fragment(request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "fragments/devices.html", actor, **_list_data(ctx, request))


def _device_data(ctx: Ctx, actor: Actor, device_id: str) -> dict[str, Any]:
    return {
        "device": get_device(device_id, ctx, actor),
        "history": device_history(device_id, ctx, actor, limit=20),
        "ranges": RANGES,
    }


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def one_device_page(device_id: str, request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    try:
        data = _device_data(ctx, actor, device_id)
    except HTTPException as exc:
        return not_found(request, actor, exc)
    return render(request, "device.html", actor, **data)


@router.get("/ui/fragments/devices/{device_id}", response_class=HTMLResponse)
def device_fragment(device_id: str, request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "fragments/device.html", actor, **_device_data(ctx, actor, device_id))


def config_value(text: str) -> Any:
    """A live setting's value as typed: JSON when it parses (numbers, true, null, lists),
    else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@router.post("/ui/devices/{device_id}/command", response_class=HTMLResponse)
def device_command(
    device_id: str,
    request: Request,
    ctx: Ctx,
    actor: PageOperator,
    op: Annotated[str, Form(max_length=16)],
    pipeline: Annotated[str, Form(max_length=128)] = "",
    model: Annotated[str, Form(max_length=128)] = "",
    to_version: Annotated[str, Form(max_length=128)] = "",
    key: Annotated[str, Form(max_length=256)] = "",
    value: Annotated[str, Form(max_length=4096)] = "",
) -> HTMLResponse:
    fields: dict[str, Any] = {"op": op, "device": device_id}
    if op == "restart" and pipeline:
        fields["pipeline"] = pipeline
    if op == "rollback":
        fields.update(model=model or None, to_version=to_version.strip() or None)
    if op == "config":
        fields["changes"] = {key.strip(): config_value(value)} if key.strip() else {}
    try:
        sent = send_commands(ctx, actor, CommandRequest(**fields))
    except ValidationError as err:
        return _result(request, actor, None, f"body.{format_validation_error(err)}")
    except HTTPException as exc:
        return _result(request, actor, None, str(exc.detail))
    ids = ", ".join(c.id for c in sent.commands)
    return _result(request, actor, f"{op} sent to {device_id} (command {ids})", None)


def _result(request: Request, actor: Actor, done: str | None, error: str | None) -> HTMLResponse:
    # htmx swaps only 2xx answers: a refusal is a 200 fragment with role=alert.
    return render(request, "fragments/action_result.html", actor, done=done, error=error)
