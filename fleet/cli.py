"""edge-fleet: status, deploy, rollback, ping and watch over the edge-deploy MQTT protocol."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.models.manifest import Bundle, BundleError, load_public_key, verify_bundle
from agent.protocol import (
    DEFAULT_PREFIX,
    MAX_COMMAND_BYTES,
    MIN_CHUNK_BYTES,
    Command,
    DeployCommand,
    PingCommand,
    RollbackCommand,
    State,
    UrlArtifact,
    validate_device_id,
    validate_group_id,
    validate_name,
)

from . import captures, render
from .client import ServerError
from .console import BrokerOptions, Console, ConsoleError, DeviceView
from .rollout import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CommandRun,
    RunHooks,
    RunReport,
    Target,
    parse_canary,
    plan_waves,
    resolve_targets,
)
from .serve import DEFAULT_CHUNK_SIZE, offer_artifact, parse_bind
from .server import main as server_main
from .signing import CommandSigner

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGE_FLEET_PASSWORD"
USERNAME_ENV = "EDGE_FLEET_USERNAME"
BROKER_ENV = "EDGE_FLEET_BROKER"
COMMAND_KEY_ENV = "EDGE_FLEET_COMMAND_KEY"
SERVER_ENV = "EDGE_FLEET_SERVER"
TOKEN_ENV = "EDGE_FLEET_TOKEN"
# Commands that only exist through a fleet server.
SERVER_ONLY = ("rollouts", "history")


class UsageError(Exception):
    """Bad arguments or input; exit 2 with one line."""


# ------------------------------------------------------------------------ parser


def _id(check: Callable[[str], str]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive(value: str) -> float:
    try:
        number = float(value)
        if number <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
        if not 0 <= number <= 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}") from None
    return number


def build_parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")

    server = argparse.ArgumentParser(add_help=False)
    g = server.add_argument_group("fleet server")
    g.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV) or None,
        metavar="URL",
        help=f"go through this fleet server (http://HOST:PORT) instead of MQTT (env {SERVER_ENV})",
    )
    g.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the server's API token (or set env {TOKEN_ENV})",
    )

    common = argparse.ArgumentParser(add_help=False, parents=[output])
    b = common.add_argument_group("broker")
    b.add_argument(
        "--broker",
        default=os.environ.get(BROKER_ENV, "127.0.0.1:1883"),
        help=f"HOST[:PORT] of the MQTT broker (env {BROKER_ENV}; default 127.0.0.1:1883)",
    )
    b.add_argument("--host", help="broker host (overrides --broker)")
    b.add_argument("--port", type=int, help="broker port (overrides --broker)")
    b.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: edge)")
    b.add_argument("--tls", action="store_true", help="use TLS with the system's CA certificates")
    b.add_argument("--cafile", type=Path, help="CA certificate (PEM); implies TLS")
    b.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    b.add_argument("--key", type=Path, help="client key (PEM) for mutual TLS")
    b.add_argument("--username", default=os.environ.get(USERNAME_ENV), help=f"env {USERNAME_ENV}")
    b.add_argument(
        "--password-file",
        type=Path,
        help=f"file holding the broker password (or set env {PASSWORD_ENV})",
    )
    b.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="S")
    common.add_argument(
        "--command-key",
        type=Path,
        default=os.environ.get(COMMAND_KEY_ENV) or None,
        metavar="KEY",
        help="Ed25519 private key (PEM) that signs every command, for devices with "
        f"mqtt.require_signed_commands (env {COMMAND_KEY_ENV})",
    )

    targets = argparse.ArgumentParser(add_help=False)
    g = targets.add_argument_group("targets")
    g.add_argument(
        "--device",
        dest="devices",
        action="extend",
        nargs="+",
        type=_id(validate_device_id),
        default=[],
        metavar="ID",
    )
    g.add_argument("--group", type=_id(validate_group_id), metavar="G")

    parser = argparse.ArgumentParser(
        prog="edge-fleet", description="Status, deploys, staged rollouts and rollback of a fleet."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server_main.add_parser(sub)

    p = sub.add_parser("status", parents=[common, server, targets], help="one row per device")
    p.add_argument(
        "--wait",
        type=_positive,
        default=2.0,
        metavar="S",
        help="how long to wait for the telemetry of online devices (default 2)",
    )

    p = sub.add_parser("deploy", parents=[common, server, targets], help="deploy a bundle")
    p.add_argument("bundle", type=Path, help="bundle directory (model.tflite, manifest.json, ...)")
    p.add_argument(
        "--pub",
        type=Path,
        action="append",
        default=[],
        metavar="KEY",
        help="trusted public key (PEM) to check the bundle's signature; repeatable",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="deploy a bundle without a signature (devices may still refuse it)",
    )
    p.add_argument("--canary", metavar="N|P%", help="deploy to N devices (or P%%) first")
    p.add_argument(
        "--max-failures",
        type=int,
        default=0,
        metavar="N",
        help="halt the rollout once more than N devices failed (default 0)",
    )
    p.add_argument(
        "--via",
        choices=("http", "mqtt"),
        default="http",
        help="built-in HTTP server (default) or chunks over MQTT",
    )
    p.add_argument(
        "--bind",
        metavar="HOST:PORT",
        help="address of the built-in HTTP server (default: the address that "
        "reaches the broker, a free port)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST",
        help="host name devices use to reach the HTTP server (default: bind host)",
    )
    p.add_argument(
        "--url",
        help="the model file is already served at this https://, http:// or file:// URL "
        "(object storage, a CDN, a shared mount): no built-in server",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"MQTT chunk size, {MIN_CHUNK_BYTES}..{MAX_COMMAND_BYTES} bytes (default 64 KiB)",
    )
    p.add_argument("--pipeline", type=_id(validate_name), help="pipeline to serve the model on")
    p.add_argument(
        "--min-agreement",
        type=_fraction,
        metavar="X",
        help="least agreement (0..1) with the serving version in shadow evaluation "
        "(default: each device's models.probation.min_agreement)",
    )
    p.add_argument(
        "--shadow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the new version beside the serving one before the swap; --no-shadow "
        "swaps it in without (default: each device's models.probation.shadow)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=600.0,
        metavar="S",
        help="stop waiting after S seconds (default 600)",
    )
    p.add_argument(
        "--expires",
        type=_positive,
        default=3600.0,
        metavar="S",
        help="devices refuse the command after S seconds (default 3600)",
    )
    s = p.add_argument_group("with --server")
    s.add_argument(
        "--waves",
        type=int,
        default=1,
        metavar="N",
        help="split the devices after the canary into N waves (default 1)",
    )
    s.add_argument(
        "--approval", action="store_true", help="wait for an operator's approval between waves"
    )
    s.add_argument(
        "--no-follow",
        action="store_true",
        help="return once the rollout is created (the server carries it out)",
    )

    p = sub.add_parser("rollback", parents=[common, server, targets], help="go back to a version")
    p.add_argument("--model", type=_id(validate_name), help="model name (default: the only one)")
    p.add_argument("--to", dest="to_version", type=_id(validate_name), metavar="VERSION")
    p.add_argument("--timeout", type=_positive, default=120.0, metavar="S")
    p.add_argument("--expires", type=_positive, default=3600.0, metavar="S")

    p = sub.add_parser("ping", parents=[common, targets], help="round trip to devices")
    p.add_argument("--timeout", type=_positive, default=5.0, metavar="S")

    p = sub.add_parser("watch", parents=[common], help="live stream of the fleet")
    p.add_argument(
        "--device",
        dest="devices",
        action="extend",
        nargs="+",
        type=_id(validate_device_id),
        default=[],
        metavar="ID",
    )
    p.add_argument("--results", action="store_true", help="include inference results")
    p.add_argument("--telemetry", action="store_true", help="include telemetry")
    p.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    p.add_argument("--duration", type=_positive, metavar="S", help="stop after S seconds")

    p = sub.add_parser(
        "rollouts", parents=[output, server], help="the server's rollouts, or one (--id)"
    )
    p.add_argument("--id", metavar="ROLLOUT", help="show one rollout with its devices")
    p.add_argument("--state", help="only rollouts in this state")
    p.add_argument("--model", type=_id(validate_name), help="only rollouts of this model")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    act = p.add_mutually_exclusive_group()
    for action, text in (
        ("approve", "open the next wave of a rollout waiting for approval"),
        ("pause", "stop sending to further devices"),
        ("resume", "carry on a paused or halted rollout"),
        ("abort", "stop it and restore the previous desired state"),
    ):
        act.add_argument(f"--{action}", action="store_true", help=f"with --id: {text}")

    p = sub.add_parser(
        "history", parents=[output, server], help="a device's versions, commands and events"
    )
    p.add_argument("device_id", metavar="DEVICE", type=_id(validate_device_id))
    p.add_argument("--limit", type=int, default=20, metavar="N", help="rows of each (default 20)")

    captures.add_parser(sub, [output])
    return parser


def broker_options(args: argparse.Namespace) -> BrokerOptions:
    host, sep, port_text = str(args.broker).rpartition(":")
    if not sep:
        host, port_text = args.broker, "1883"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--broker {args.broker!r}: expected HOST[:PORT]") from None
    password = os.environ.get(PASSWORD_ENV)
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--password-file: {exc}") from None
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together")
    try:
        return BrokerOptions(
            host=args.host or host,
            port=args.port or port,
            prefix=args.prefix,
            cafile=args.cafile,
            certfile=args.cert,
            keyfile=args.key,
            tls=args.tls,
            username=args.username,
            password=password,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def command_signer(args: argparse.Namespace) -> CommandSigner | None:
    if args.command_key is None:
        return None
    try:
        return CommandSigner.from_file(Path(args.command_key))
    except BundleError as exc:
        raise UsageError(f"--command-key: {exc}") from None


def _console(args: argparse.Namespace, results: bool = False) -> Console:
    signer = command_signer(args)
    try:
        console = Console(broker_options(args), results=results, signer=signer)
    except ValueError as exc:  # a bad --prefix
        raise UsageError(str(exc)) from None
    console.connect(args.connect_timeout)
    return console


def _states(console: Console) -> dict[str, State | None]:
    return {d: v.state for d, v in console.devices().items()}


def _targets(console: Console, args: argparse.Namespace) -> list[Target]:
    try:
        return resolve_targets(_states(console), args.devices, args.group)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    if args.devices and args.group:
        raise UsageError("give either --device or --group, not both")
    console = _console(args)
    try:
        console.wait_for_retained()
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            views = _selected(console.devices(), args)
            if all(v.telemetry is not None for v in views if v.online):
                break
            time.sleep(0.05)
        views = _selected(console.devices(), args)
    finally:
        console.close()
    rows = [render.status_row(v) for v in views]
    if args.json:
        print(render.dumps({"devices": rows}))
    elif rows:
        print(render.status_table(rows))
    else:
        print("no devices have announced themselves under this prefix")
    return EXIT_OK


def _selected(views: dict[str, DeviceView], args: argparse.Namespace) -> list[DeviceView]:
    if args.devices:
        return [views.get(d, DeviceView(d)) for d in args.devices]
    chosen = [v for v in views.values() if args.group is None or args.group in v.groups]
    return sorted(chosen, key=lambda v: v.device)


# ------------------------------------------------------------------------ deploy


def load_bundle(args: argparse.Namespace) -> Bundle:
    """The bundle, checked (signature, sha256, size) before anything is sent."""
    if not args.pub and not args.allow_unsigned:
        raise UsageError(
            "deploy needs --pub KEY to check the bundle's signature (or --allow-unsigned)"
        )
    try:
        keys = [load_public_key(path) for path in args.pub]
        return verify_bundle(args.bundle, keys, require_signature=not args.allow_unsigned)
    except BundleError as exc:
        raise UsageError(f"refusing {args.bundle}: {exc}") from None


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.waves != 1 or args.approval or args.no_follow:
        raise UsageError("--waves, --approval and --no-follow go with --server")
    bundle = load_bundle(args)
    try:
        canary = parse_canary(args.canary) if args.canary else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_failures < 0:
        raise UsageError("--max-failures must be 0 or more")
    if not MIN_CHUNK_BYTES <= args.chunk_size <= MAX_COMMAND_BYTES:
        raise UsageError(f"--chunk-size must be {MIN_CHUNK_BYTES}..{MAX_COMMAND_BYTES} bytes")
    if args.url and args.via != "http":
        raise UsageError("--url goes with --via http")
    if args.url:
        try:
            UrlArtifact(url=args.url)
        except ValidationError:
            raise UsageError(
                f"--url {args.url!r}: expected an https://, http:// or file:// URL"
            ) from None
    m = bundle.manifest
    console = _console(args)
    try:
        console.wait_for_retained()
        waves = plan_waves(_targets(console, args), canary)
        local = console.local_address()
        try:
            bind = parse_bind(args.bind or "", local)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # A wildcard bind is not an address devices can use: name the interface that
        # reaches the broker instead.
        advertise = args.advertise or (local if bind[0] in ("0.0.0.0", "::") else bind[0])
        offer = offer_artifact(
            bundle,
            args.via,
            topics=console.topics,
            publish_many=lambda msgs: console.publish_many(msgs),
            subscribe=console.subscribe,
            advertise=advertise,
            bind=bind,
            url=args.url,
            chunk_size=args.chunk_size,
        )
        try:

            def make(cid: str, issued: float, expires: float) -> Command:
                return DeployCommand(
                    id=cid,
                    issued_at=issued,
                    expires_at=expires,
                    manifest=bundle.manifest_data,
                    signature=bundle.signature,
                    artifact=offer.artifact,
                    pipeline=args.pipeline,
                    shadow=args.shadow,
                    min_agreement=args.min_agreement,
                )

            if not args.json:
                sizes = " + ".join(str(len(w)) for w in waves)
                print(
                    f"deploying {m.name} {m.version} to {sizes} device(s) via {args.via}: "
                    f"{offer.artifact.model_dump_json(exclude_none=True)}"
                )
            report = _run(console, args, waves, make, "deploy")
        finally:
            offer.close()
    finally:
        console.close()
    extra = {
        "model": m.name,
        "version": m.version,
        "via": args.via,
        "artifact": offer.artifact.model_dump(mode="json", exclude_none=True),
    }
    return _finish(args, report, f"deploy {m.name} {m.version}", extra)


def _run(
    console: Console,
    args: argparse.Namespace,
    waves: list[list[Target]],
    make: Callable[[str, float, float], Command],
    op: str,
) -> RunReport:
    now = time.time()
    printer = render.ProgressPrinter(sys.stdout)
    hooks = RunHooks(on_change=(lambda _p: None) if args.json else printer)
    expires = getattr(args, "expires", args.timeout)
    run = CommandRun(
        sender=console,
        waves=waves,
        make_command=make,
        expires_at=now + expires,
        deadline=now + args.timeout,
        max_failures=getattr(args, "max_failures", 0),
        hooks=hooks,
        op=op,
    )
    return run.run()


def _finish(
    args: argparse.Namespace, report: RunReport, what: str, extra: dict[str, Any] | None = None
) -> int:
    if args.json:
        print(render.dumps({**(extra or {}), **render.report_json(report)}))
    else:
        print(render.report_table(report))
        print(render.report_summary(report, what))
    return report.exit_code


# ------------------------------------------------------------------ rollback, ping


def cmd_rollback(args: argparse.Namespace) -> int:
    console = _console(args)
    try:
        console.wait_for_retained()
        targets = _targets(console, args)
        model = args.model or _only_model(console, targets)

        def make(cid: str, issued: float, expires: float) -> Command:
            return RollbackCommand(
                id=cid,
                issued_at=issued,
                expires_at=expires,
                model=model,
                to_version=args.to_version,
            )

        report = _run(console, args, [targets], make, "rollback")
    finally:
        console.close()
    return _finish(args, report, f"rollback {model}", {"model": model})


def _only_model(console: Console, targets: list[Target]) -> str:
    names = {
        m.name
        for t in targets
        if (state := console.view(t.device).state) is not None
        for m in state.models
    }
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise UsageError(f"give --model NAME (models on the targets: {found})")
    return names.pop()


def cmd_ping(args: argparse.Namespace) -> int:
    console = _console(args)
    try:
        console.wait_for_retained()
        if args.devices or args.group:
            targets = _targets(console, args)
        else:
            targets = [
                Target(d, True, True) for d, v in sorted(console.devices().items()) if v.online
            ]
            if not targets:
                raise UsageError("no device is online under this prefix")

        def make(cid: str, issued: float, expires: float) -> Command:
            return PingCommand(id=cid, issued_at=issued, expires_at=expires)

        report = _run(console, args, [targets], make, "ping")
    finally:
        console.close()
    return _finish(args, report, "ping")


# ------------------------------------------------------------------------- watch


def cmd_watch(args: argparse.Namespace) -> int:
    console = _console(args, results=args.results)
    deadline = time.monotonic() + args.duration if args.duration else None
    shown = 0
    try:
        while args.count is None or shown < args.count:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                event = console.events.get(timeout=min(wait, 0.5))
            except queue.Empty:
                continue
            kind = render.event_json(event)
            if kind["kind"] == "telemetry" and not args.telemetry:
                continue
            if args.devices and kind.get("device") not in args.devices:
                continue
            print(render.dumps(kind) if args.json else render.event_line(event), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        console.close()
    return EXIT_OK


# -------------------------------------------------------------------------- main

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "ping": cmd_ping,
    "watch": cmd_watch,
    "captures": captures.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "server":
        return server_main.run(args)
    command = COMMANDS.get(args.command)
    if args.command in SERVER_ONLY or getattr(args, "server", None):
        # Imported here: the client mode builds on this module (UsageError, load_bundle).
        from . import cli_server

        command = cli_server.COMMANDS[args.command]
    assert command is not None
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return command(args)
    except UsageError as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConsoleError as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ServerError as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        # The server refused the request as given: the operator's to fix, as a usage error.
        return EXIT_USAGE if exc.status is not None and 400 <= exc.status < 500 else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
