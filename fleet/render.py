"""How the console shows things: status rows, progress lines, watch lines, and their JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TextIO

from .console import (
    DeviceView,
    Event,
    InvalidEvent,
    ReplyEvent,
    ResultEvent,
    StateEvent,
    TelemetryEvent,
)
from .rollout import DeviceProgress, RunReport


def status_row(view: DeviceView) -> dict[str, Any]:
    """The figures of one device, from its retained state and latest telemetry."""
    s, t = view.state, view.telemetry
    pipes = t.pipelines.values() if t else []
    p95s = [p.invoke_ms_p95 for p in pipes if p.invoke_ms_p95 is not None]
    psis = [p.drift for p in pipes if p.drift is not None]
    row: dict[str, Any] = {
        "device": view.device,
        "online": view.online,
        "groups": view.groups,
        "models": [
            {
                k: v
                for k, v in m.model_dump().items()
                if k in ("name", "active", "status", "last_known_good", "versions")
            }
            for m in (s.models if s else [])
        ],
        "fps": round(sum(p.fps for p in pipes), 2) if t else None,
        "invoke_ms_p95": max(p95s) if p95s else None,
        # The largest output drift (PSI) of the device's pipelines, and the warnings
        # the retained state carries (pipeline -> text).
        "drift": max(psis) if psis else None,
        "drift_warnings": {p.name: p.drift for p in (s.pipelines if s else []) if p.drift},
        "temperature_c": t.temperature_c if t else None,
        "outbox_depth": t.outbox_depth if t else None,
        "last_seen": view.last_seen,
        "agent_version": s.agent_version if s else None,
    }
    if s is not None:
        row["state"] = s.model_dump(mode="json", exclude_none=True)
    if t is not None:
        row["telemetry"] = t.model_dump(mode="json", exclude_none=True)
    return row


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    age = max(0.0, now - ts)
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def status_table(rows: Sequence[dict[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = (
        "DEVICE", "ONLINE", "MODELS", "FPS", "P95 MS", "DRIFT", "TEMP C", "OUTBOX", "LAST SEEN"
    )  # fmt: skip
    lines = [header]
    for r in rows:
        models = (
            ", ".join(f"{m['name']} {m.get('active') or '-'} ({m['status']})" for m in r["models"])
            or "-"
        )
        lines.append(
            (
                r["device"],
                "yes" if r["online"] else "no",
                models,
                _num(r["fps"], ".1f"),
                _num(r["invoke_ms_p95"], ".1f"),
                _drift(r),
                _num(r["temperature_c"], ".1f"),
                _num(r["outbox_depth"], "d"),
                _age(r["last_seen"], now),
            )
        )
    return table(lines)


def _drift(row: dict[str, Any]) -> str:
    """The largest PSI, and ``warn`` while a pipeline's state carries a drift warning
    (an online device's latest telemetry may predate it by an interval, or lack it)."""
    psi = _num(row["drift"], ".2f")
    if not row["drift_warnings"]:
        return psi
    return "warn" if row["drift"] is None else f"{psi} warn"


def table(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# ---------------------------------------------------------------------- progress


class ProgressPrinter:
    """One line per visible change of a device; download percentages in steps of 25."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._shown: dict[str, tuple[str, int]] = {}

    def __call__(self, p: DeviceProgress) -> None:
        step = int(p.percent // 25) if p.percent is not None else -1
        key = (p.status, step)
        if self._shown.get(p.device) == key:
            return
        self._shown[p.device] = key
        self.out.write(progress_line(p) + "\n")
        self.out.flush()


def progress_line(p: DeviceProgress) -> str:
    text = f"  {p.device:<20} {p.status}"
    if p.percent is not None:
        text += f" {p.percent:.0f}%"
    agreement = p.data.get("agreement") if p.status == "shadow" and p.data else None
    if isinstance(agreement, float | int):
        text += f" agreement {agreement:.2f}"
    if p.status == "failed" and p.code:
        text += f" [{p.code}]"
    if p.message and p.message != p.status and p.status not in ("accepted", "done"):
        text += f"  ({p.message})"
    elif p.status == "done" and _note(p):
        text += f"  ({_note(p)})"
    return text


def _note(p: DeviceProgress) -> str:
    """What a ``done`` reply's data says beside success (a model no pipeline uses)."""
    note = p.data.get("note") if p.status == "done" and p.data else None
    return note if isinstance(note, str) else ""


def report_table(report: RunReport) -> str:
    lines = [("DEVICE", "WAVE", "RESULT", "CODE", "DETAIL")]
    for d in report.devices:
        lines.append((d.device, str(d.wave), d.status, d.code or "-", d.message or _note(d) or "-"))
    return table(lines)


def report_summary(report: RunReport, what: str) -> str:
    done = sum(1 for d in report.devices if d.status == "done")
    total = len(report.devices)
    if report.result == "ok":
        return f"{what}: all {total} device(s) done"
    failed = ", ".join(f"{d.device} ({d.code or d.status}: {d.message})" for d in report.failed())
    text = f"{what}: {report.result.upper()}, {done}/{total} done"
    if failed:
        text += f"; failed: {failed}"
    if report.halted:
        skipped = [d.device for d in report.devices if d.status == "skipped"]
        text += f"; halted before {len(skipped)} device(s): {', '.join(skipped) or '-'}"
    return text


def report_json(report: RunReport) -> dict[str, Any]:
    return {
        "result": report.result,
        "exit_code": report.exit_code,
        "halted": report.halted,
        "expires_at": report.expires_at,
        "devices": [d.as_dict() for d in report.devices],
        "failed": [d.device for d in report.failed()],
        "pending": [d.device for d in report.unfinished() if d.status != "skipped"],
        "skipped": [d.device for d in report.devices if d.status == "skipped"],
    }


# ------------------------------------------------------------------------- watch


def event_json(event: Event) -> dict[str, Any]:
    if isinstance(event, InvalidEvent):
        return {
            "kind": "invalid",
            "topic": event.topic,
            "problem": event.problem,
            "received": event.received,
        }
    kind, message = _kind_and_message(event)
    return {
        "kind": kind,
        "device": event.device,
        "received": event.received,
        "message": message.model_dump(mode="json", exclude_none=True),
    }


def _kind_and_message(
    event: StateEvent | TelemetryEvent | ReplyEvent | ResultEvent,
) -> tuple[str, Any]:
    if isinstance(event, StateEvent):
        return "state", event.state
    if isinstance(event, TelemetryEvent):
        return "telemetry", event.telemetry
    if isinstance(event, ReplyEvent):
        return "reply", event.reply
    return "result", event.result


def event_line(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.received))
    if isinstance(event, InvalidEvent):
        return f"{stamp} invalid    {event.topic}: {event.problem}"
    if isinstance(event, StateEvent):
        s = event.state
        models = ", ".join(f"{m.name} {m.active or '-'} ({m.status})" for m in s.models) or "-"
        text = f"{'online' if s.online else 'offline'}; models: {models}"
    elif isinstance(event, TelemetryEvent):
        t = event.telemetry
        fps = sum(p.fps for p in t.pipelines.values())
        text = (
            f"seq {t.seq} fps {fps:.1f} cpu {_num(t.cpu_percent, '.0f')}% "
            f"temp {_num(t.temperature_c, '.1f')} outbox {t.outbox_depth}"
        )
    elif isinstance(event, ReplyEvent):
        r = event.reply
        text = f"{r.id} {r.status} {r.code.value}"
        if r.stage:
            text += f" {r.stage}"
        if r.percent is not None:
            text += f" {r.percent:.0f}%"
        if r.message:
            text += f": {r.message}"
    else:
        res = event.result
        top = res.classes[0] if res.classes else None
        best = f" top {top.label or top.index} {top.score:.2f}" if top else ""
        text = f"{res.pipeline} #{res.seq} {res.model} {res.version}{best} {res.latency_ms:.1f}ms"
    kind, _ = _kind_and_message(event)
    return f"{stamp} {kind:<9}  {event.device:<20} {text}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# ------------------------------------------------------------------ server mode


def server_status_table(rows: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """Devices as the fleet server lists them (``GET /api/devices`` rows)."""
    now = time.time() if now is None else now
    lines = [("DEVICE", "ONLINE", "STATUS", "MODELS", "FPS", "P95 MS", "AGENT", "LAST SEEN")]
    for r in rows:
        models = ", ".join(f"{name} {active or '-'}" for name, active in r["models"].items())
        lines.append(
            (
                r["id"],
                "yes" if r["online"] else "no",
                r["status"],
                models or "-",
                _num(r["fps"], ".1f"),
                _num(r["invoke_p95_ms"], ".1f"),
                r.get("agent_version") or "-",
                _age(r["last_seen"], now),
            )
        )
    return table(lines)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def rollouts_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [("ROLLOUT", "STATE", "MODEL", "VERSION", "TARGET", "DONE", "CREATED", "BY")]
    for r in rows:
        counts: dict[str, int] = r.get("counts") or {}
        lines.append(
            (
                r["id"],
                r["state"],
                r["model"],
                r["version"],
                f"{r['target_kind']}/{r['target']}",
                f"{counts.get('done', 0)}/{sum(counts.values())}",
                _when(r["created_at"]),
                r["created_by"],
            )
        )
    return table(lines)


def rollout_text(view: dict[str, Any]) -> str:
    """One rollout: what, where, its state, and a row per device."""
    plan = view.get("plan") or {}
    # Waves count from 1 here, for people; the API's JSON counts from 0.
    waves = plan.get("wave_count") or len(view.get("waves") or []) or 1
    head = (
        f"rollout {view['id']}: {view['model']} {view['version']} to "
        f"{view['target_kind']}/{view['target']}, {view['state']}"
        f" (wave {view['current_wave'] + 1} of {waves}; {render_plan(plan)}"
        f"{render_checks(view)})"
    )
    if view.get("message"):
        head += f": {view['message']}"
    lines = [("DEVICE", "WAVE", "STATUS", "TRIES", "CODE", "DETAIL")]
    for d in view.get("devices", []):
        lines.append(
            (
                d["device"],
                str(d["wave"] + 1),
                d["status"],
                str(d.get("attempts", 0)),
                d.get("code") or "-",
                d.get("message") or "-",
            )
        )
    return head + "\n" + table(lines)


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as an operator wrote it: canary, max failures, approval."""
    parts = []
    if plan.get("canary"):
        parts.append(f"canary {plan['canary']}")
    parts.append(f"max failures {plan.get('max_failures', 0)}")
    if plan.get("approval"):
        parts.append("approval between waves")
    return ", ".join(parts)


def render_checks(view: dict[str, Any]) -> str:
    """A rollout's model-health checks, when set (unset: each device's config decides)."""
    parts = []
    if view.get("shadow") is not None:
        parts.append(f"shadow {'on' if view['shadow'] else 'off'}")
    if view.get("min_agreement") is not None:
        parts.append(f"min agreement {view['min_agreement']:g}")
    return "".join(f", {p}" for p in parts)


def history_text(history: dict[str, Any]) -> str:
    """A device's versions, recent commands and events (``GET /api/devices/ID/history``)."""
    versions = [("MODEL", "VERSION", "FROM", "UNTIL")] + [
        (v["model"], v["version"] or "-", _when(v["started"]), _when(v["ended"]))
        for v in history["versions"]
    ]
    commands = [("COMMAND", "OP", "SENT", "BY", "STATUS", "CODE", "DETAIL")] + [
        (
            c["id"],
            c["op"],
            _when(c["created_at"]),
            c["created_by"],
            c["status"],
            c.get("code") or "-",
            c.get("message") or "-",
        )
        for c in history["commands"]
    ]
    events = [("WHEN", "EVENT", "DETAIL")] + [
        (_when(e["ts"]), e["kind"], e.get("message") or "-") for e in history["events"]
    ]
    return "\n\n".join(
        f"{title}:\n{table(rows)}" if len(rows) > 1 else f"{title}: none"
        for title, rows in (("versions", versions), ("commands", commands), ("events", events))
    )
