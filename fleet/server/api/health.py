"""``/healthz`` and ``/metrics``: no token, as for the agent's endpoints.

Metrics are collected at scrape time into a registry of this app's own (not the
process-wide default one, so two apps in one process never mix): devices by
status, device pipelines with a drift warning and rollouts by state from the
database (fleet-wide counts: no per-device labels, so the series stay few whatever
the fleet's size), and the running parts' figures
(``ctx.figures()``: ingest rate, reconcile lag, ...) as gauges.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ..context import ServerContext
from ..db import DatabaseError
from ..db.schema import Device, DevicePipeline, Rollout
from .deps import Ctx

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

DEVICE_STATUSES = ("ok", "degraded", "offline")
ROLLOUT_STATES = (
    "running",
    "waiting_approval",
    "paused",
    "halted",
    "done",
    "aborted",
    "superseded",
)
_NOT_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def numeric_figures(ctx: ServerContext) -> dict[str, float]:
    """The figures that are numbers (bools as 0/1); a failing source is logged, not fatal."""
    try:
        figures = ctx.figures()
    except Exception:
        log.exception("figures of the running parts failed")
        return {}
    out: dict[str, float] = {}
    for name, value in figures.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[_NOT_METRIC_CHARS.sub("_", str(name))] = float(value)
    return out


class FleetCollector(Collector):
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        with self.ctx.database.session() as s:
            by_status = dict(
                s.execute(select(Device.status, func.count()).group_by(Device.status)).all()
            )
            by_state = dict(
                s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all()
            )
            online = s.scalar(select(func.count()).where(Device.online.is_(True))) or 0
            drifting = s.scalar(select(func.count()).where(DevicePipeline.drift.is_not(None))) or 0
        devices = GaugeMetricFamily(
            "edge_fleet_devices", "Devices known to the server, by status", labels=["status"]
        )
        for status in sorted(set(DEVICE_STATUSES) | set(by_status)):
            devices.add_metric([status], by_status.get(status, 0))
        yield devices
        yield GaugeMetricFamily("edge_fleet_devices_online", "Devices online", value=online)
        yield GaugeMetricFamily(
            "edge_fleet_pipelines_drifting",
            "Device pipelines whose state carries a drift warning",
            value=drifting,
        )
        rollouts = GaugeMetricFamily("edge_fleet_rollouts", "Rollouts, by state", labels=["state"])
        for state in sorted(set(ROLLOUT_STATES) | set(by_state)):
            rollouts.add_metric([state], by_state.get(state, 0))
        yield rollouts
        for name, value in sorted(numeric_figures(self.ctx).items()):
            yield GaugeMetricFamily(f"edge_fleet_{name}", f"server figure {name}", value=value)


def metrics_registry(ctx: ServerContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(ctx))
    return registry


@router.get("/healthz")
async def healthz(ctx: Ctx) -> JSONResponse:
    try:
        await run_in_threadpool(ctx.database.check)
    except DatabaseError as exc:
        return JSONResponse({"ok": False, "detail": str(exc)}, status_code=503)
    body: dict[str, Any] = {"ok": True, "database": ctx.database.dialect}
    body.update(numeric_figures(ctx))
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    text = await run_in_threadpool(generate_latest, registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
