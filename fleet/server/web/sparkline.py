"""Sparklines of fps over the last hour for a page of devices, as inline SVG points."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..db.schema import TelemetryMinute

MINUTES = 60
WIDTH, HEIGHT = 120, 24


def fps_points(s: Session, ids: list[str], now: float) -> dict[str, str]:
    """device id -> SVG polyline ``points`` of its device-wide fps per minute (one query
    for the page's devices, over the minute index)."""
    if not ids:
        return {}
    first = int(now // 60) - MINUTES + 1
    series: dict[str, list[tuple[int, float]]] = {}
    T = TelemetryMinute
    for device, minute, fps_sum, samples in s.execute(
        select(T.device_id, T.minute, T.fps_sum, T.samples)
        .where(T.device_id.in_(ids), T.pipeline == "", T.minute >= first)
        .order_by(T.device_id, T.minute)
    ):
        if samples:
            series.setdefault(device, []).append((minute - first, fps_sum / samples))
    out: dict[str, str] = {}
    for device, points in series.items():
        top = max(v for _, v in points) or 1.0
        x_step = WIDTH / (MINUTES - 1)
        out[device] = " ".join(
            f"{m * x_step:.1f},{HEIGHT - 1 - (v / top) * (HEIGHT - 2):.1f}" for m, v in points
        )
    return out
