"""edge-fleet's client mode: status, deploy, rollback, rollouts and history through a
fleet server (``--server URL``) instead of straight over MQTT.

The server owns rollouts: ``deploy`` uploads the bundle, creates a rollout and then
only follows it, so an interrupted or timed-out CLI leaves it running; the live
lines and the closing table are the ones the MQTT mode prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from . import render
from .cli import SERVER_ENV, TOKEN_ENV, UsageError, load_bundle
from .client import ServerClient
from .rollout import EXIT_OK, DeviceProgress, RunReport, outcome, parse_canary

POLL_S = 0.5
EXIT_INTERRUPTED = 130

# Rollout states after which nothing more happens without the operator.
STOPPED = frozenset({"halted", "aborted", "superseded"})
# Device rows of a rollout that no longer change by themselves.
SETTLED_ROWS = frozenset({"done", "given_up", "skipped"})
# Rows that wait for the device (offline) or for their wave; no command in flight.
IDLE_ROWS = frozenset({"waiting", "pending", "failed"})


def server_client(args: argparse.Namespace, timeout: float = 30.0) -> ServerClient:
    if not args.server:
        raise UsageError(f"{args.command} needs --server URL (or env {SERVER_ENV})")
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise UsageError(f"--token-file: {exc}") from None
    try:
        return ServerClient(args.server, token, timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _target(args: argparse.Namespace) -> dict[str, str]:
    """The API's target: one group or one device."""
    if args.group and args.devices:
        raise UsageError("give either --device or --group, not both")
    if args.group:
        return {"group": args.group}
    if len(args.devices) == 1:
        return {"device": args.devices[0]}
    if args.devices:
        raise UsageError("with --server, deploy to one --device or a --group")
    raise UsageError("no target: give --device ID or --group G")


# ------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    client = server_client(args)
    if args.group and args.devices:
        raise UsageError("give either --device or --group, not both")
    if args.devices:
        rows = [_as_row(client.device(d)) for d in args.devices]
    else:
        rows = client.all_devices(group=args.group)
    if args.json:
        print(render.dumps({"devices": rows}))
    elif rows:
        print(render.server_status_table(rows))
    else:
        print("the server knows no devices" + (f" in group {args.group}" if args.group else ""))
    return EXIT_OK


def _as_row(device: dict[str, Any]) -> dict[str, Any]:
    """A device's detail (``GET /api/devices/ID``) cut to a list row."""
    keys = ("id", "online", "status", "groups", "fps", "invoke_p95_ms", "last_seen")
    row = {k: device[k] for k in keys}
    row["models"] = {m["name"]: m["active"] for m in device["models"]}
    row["agent_version"] = device["agent_version"]
    return row


# ------------------------------------------------------------------------ deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    target = _target(args)
    bundle = load_bundle(args)  # checked here first, as without a server
    if args.max_failures < 0:
        raise UsageError("--max-failures must be 0 or more")
    if args.canary:
        try:
            parse_canary(args.canary)  # the server checks it too; a usage error here is sooner
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    m = bundle.manifest
    client = server_client(args)
    uploaded = client.upload_bundle(bundle.path)
    body: dict[str, Any] = {
        "model": m.name,
        "version": m.version,
        "pipeline": args.pipeline,
        **target,
        "canary": args.canary,
        "waves": args.waves,
        "max_failures": args.max_failures,
        "approval": args.approval,
        # The rollout sends them in each deploy; left out, each device's config decides.
        "shadow": args.shadow,
        "min_agreement": args.min_agreement,
    }
    rollout = client.create_rollout({k: v for k, v in body.items() if v is not None})
    hint = f"edge-fleet rollouts --server {args.server} --id {rollout['id']}"
    try:
        return _report_rollout(args, client, rollout, uploaded["sha256"], target, hint)
    except KeyboardInterrupt:
        # From here on the rollout exists: whenever the operator stops, say where it is.
        print(f"\nstopped following; the rollout goes on on the server: {hint}")
        return EXIT_INTERRUPTED


def _report_rollout(
    args: argparse.Namespace,
    client: ServerClient,
    rollout: dict[str, Any],
    sha256: str,
    target: dict[str, str],
    hint: str,
) -> int:
    rid, model, version = rollout["id"], rollout["model"], rollout["version"]
    if not args.json:
        print(
            f"rollout {rid}: {model} {version} (sha256 {sha256[:12]}) to "
            f"{len(rollout.get('devices', []))} device(s), {rollout['state']}"
        )
    if args.no_follow:
        if args.json:
            print(render.dumps({"rollout": rollout}))
        else:
            print(f"the server carries it out; follow it with: {hint}")
        return EXIT_OK
    offline = _offline(client, target)
    report, view = follow_rollout(client, rid, args.timeout, offline, quiet=args.json)
    if args.json:
        summary = {"model": model, "version": version, "rollout": rid, "state": view["state"]}
        print(render.dumps({**summary, **render.report_json(report)}))
    else:
        print(render.report_table(report))
        print(render.report_summary(report, f"deploy {model} {version}"))
        if report.exit_code and not report.halted and view["state"] not in STOPPED:
            print(f"the rollout goes on on the server: {hint}")
    return report.exit_code


def _offline(client: ServerClient, target: dict[str, str]) -> set[str]:
    """The target's devices that the server sees offline now."""
    if "group" in target:
        return {d["id"] for d in client.all_devices(group=target["group"], online=False)}
    return set() if client.device(target["device"])["online"] else {target["device"]}


def follow_rollout(
    client: ServerClient,
    rollout_id: str,
    timeout: float,
    offline: set[str],
    *,
    quiet: bool = False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[RunReport, dict[str, Any]]:
    """Poll the rollout until it settles, stops or ``timeout`` passes; print changes."""
    printer = render.ProgressPrinter(sys.stdout)
    deadline = clock() + timeout
    state = ""
    while True:
        view = client.rollout(rollout_id)
        halted = view["state"] == "halted"
        devices = [
            progress_of(row, row["device"] not in offline, halted)
            for row in view.get("devices", [])
        ]
        if not quiet:
            if view["state"] != state:
                state = view["state"]
                note = f": {view['message']}" if view.get("message") else ""
                print(f"rollout {rollout_id} {state}{note}", flush=True)
            for p in devices:
                printer(p)
        if settled(view) or clock() >= deadline:
            break
        sleep(POLL_S)
    result, code = outcome(devices, halted)
    return RunReport(devices, halted, result, code, 0.0), view


def settled(view: dict[str, Any]) -> bool:
    """Nothing more to see: every row settled, the rollout stopped, or it is done with
    only devices left that wait to come online (the server sends when they do)."""
    rows = [d["status"] for d in view.get("devices", [])]
    if all(s in SETTLED_ROWS for s in rows) or view["state"] in STOPPED:
        return True
    return view["state"] == "done" and all(s in SETTLED_ROWS | IDLE_ROWS for s in rows)


def progress_of(row: dict[str, Any], online: bool, halted: bool = False) -> DeviceProgress:
    """A rollout's device row as the MQTT mode's progress: ``given_up`` is the final
    failure; ``failed`` is a try that failed and will be retried; in a halted rollout a
    row never sent is ``skipped``, as the MQTT mode shows the devices a halt left out.
    ``online`` as the server saw the device when the rollout began."""
    status, message = row["status"], row.get("message") or ""
    code = row.get("code")
    if halted and status in ("waiting", "pending"):
        status, message = "skipped", "not sent: the rollout halted"
    elif status == "given_up":
        status = "failed"
    elif status == "failed":
        status = "retrying"
        message = f"{code or 'failed'}: {message}" if message else (code or "")
    elif status == "pending" and not message and not online:
        message = "offline: the server sends it when the device returns"
    return DeviceProgress(
        device=row["device"],
        wave=row["wave"],
        online=online,
        status=status,
        command_id=row.get("command_id"),
        code=code,
        message=message,
        finished_at=row.get("finished_at"),
    )


# ---------------------------------------------------------------------- rollback


def cmd_rollback(args: argparse.Namespace) -> int:
    client = server_client(args)
    if args.group and args.devices:
        raise UsageError("give either --device or --group, not both")
    targets = [{"group": args.group}] if args.group else [{"device": d} for d in args.devices]
    if not targets:
        raise UsageError("no target: give --device ID or --group G")
    ids: list[str] = []
    for target in targets:
        body = {"op": "rollback", **target, "model": args.model, "to_version": args.to_version}
        body["expires_s"] = args.expires
        sent = client.send_command({k: v for k, v in body.items() if v is not None})
        ids.extend(c["id"] for c in sent["commands"])
    try:
        devices = follow_commands(client, ids, args.timeout, quiet=args.json)
    except KeyboardInterrupt:
        print("\nstopped following; the commands stay sent (edge-fleet history DEVICE)")
        return EXIT_INTERRUPTED
    result, code = outcome(devices, False)
    report = RunReport(devices, False, result, code, 0.0)
    what = f"rollback {args.model or ''}".rstrip()
    if args.json:
        print(render.dumps({"commands": ids, **render.report_json(report)}))
    else:
        print(render.report_table(report))
        print(render.report_summary(report, what))
    return report.exit_code


def follow_commands(
    client: ServerClient,
    ids: list[str],
    timeout: float,
    *,
    quiet: bool = False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[DeviceProgress]:
    printer = render.ProgressPrinter(sys.stdout)
    deadline = clock() + timeout
    while True:
        records = {c["id"]: c for c in client.commands(ids)}
        devices = [command_progress(records[i]) for i in ids if i in records]
        if not quiet:
            for p in devices:
                printer(p)
        if all(p.final for p in devices) or clock() >= deadline:
            return devices
        sleep(POLL_S)


def command_progress(c: dict[str, Any]) -> DeviceProgress:
    status = {"progress": c.get("stage") or "in progress", "expired": "timeout"}.get(
        c["status"], c["status"]
    )
    return DeviceProgress(
        device=c["device"],
        wave=0,
        online=True,
        status=status,
        command_id=c["id"],
        code=c.get("code"),
        message=c.get("message") or ("command expired" if status == "timeout" else ""),
        percent=c.get("percent"),
        data=c.get("data"),
        sent_at=c.get("created_at"),
        finished_at=c.get("finished_at"),
    )


# ---------------------------------------------------------------- rollouts, history


def cmd_rollouts(args: argparse.Namespace) -> int:
    client = server_client(args)
    action = next((a for a in ("approve", "pause", "resume", "abort") if getattr(args, a)), None)
    if action and not args.id:
        raise UsageError(f"--{action} needs --id ROLLOUT")
    if action:
        view = client.rollout_action(args.id, action)
    elif args.id:
        view = client.rollout(args.id)
    else:
        listed = client.rollouts(state=args.state, model=args.model, limit=args.limit)
        if args.json:
            print(render.dumps(listed))
        else:
            rows = listed["rollouts"]
            print(render.rollouts_table(rows) if rows else "no rollouts")
        return EXIT_OK
    print(render.dumps(view) if args.json else render.rollout_text(view))
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    client = server_client(args)
    history = client.history(args.device_id, limit=args.limit)
    print(render.dumps(history) if args.json else render.history_text(history))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "rollouts": cmd_rollouts,
    "history": cmd_history,
}
