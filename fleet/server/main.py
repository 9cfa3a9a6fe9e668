"""``edge-fleet server``: run the control plane, and manage its API tokens.

    edge-fleet server [--config FILE] [--db URL] [--data-dir DIR] [--bind HOST:PORT]
    edge-fleet server token add NAME [--role read|operator]
    edge-fleet server token list
    edge-fleet server token revoke NAME
    edge-fleet server migrate

This module imports only argparse at import time, so ``edge-fleet`` works on a
machine without the ``server`` extra; the server's parts load when a subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    """Register ``server`` (and its subcommands) on edge-fleet's subparsers."""
    p = sub.add_parser(
        "server",
        help="run the fleet server (desired state, rollouts, history, HTTP API)",
        description="Run the fleet's control plane beside the broker, or manage its tokens.",
    )
    p.add_argument("--config", type=Path, help="server config (YAML); every key is optional")
    p.add_argument("--db", help="database URL (overrides the config's db); default SQLite")
    p.add_argument("--data-dir", type=Path, help="data directory (overrides the config)")
    p.add_argument("--bind", help="HOST:PORT of the HTTP API (overrides http.bind)")
    p.add_argument("--broker", help="HOST[:PORT] of the MQTT broker (overrides broker.host/port)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    actions = p.add_subparsers(dest="server_command", metavar="{token,migrate}")
    t = actions.add_parser("token", help="API tokens: add, list, revoke")
    tokens = t.add_subparsers(dest="token_command", required=True, metavar="{add,list,revoke}")
    add = tokens.add_parser("add", help="make a token and print it (shown once)")
    add.add_argument("name")
    add.add_argument("--role", choices=("read", "operator"), default="read")
    tokens.add_parser("list", help="token names and roles (never the tokens)")
    revoke = tokens.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name")
    actions.add_parser("migrate", help="create or upgrade the database schema, then exit")


def server_config(args: argparse.Namespace) -> ServerConfig:
    from .config import load_config

    config = load_config(args.config)
    changes: dict[str, Any] = {}
    if args.db:
        changes["db"] = args.db
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.bind:
        changes["http"] = config.http.model_copy(update={"bind": args.bind})
    if args.broker:
        host, sep, port = str(args.broker).rpartition(":")
        if not sep:
            host, port = args.broker, str(config.broker.port)
        if not port.isdigit():
            raise ValueError(f"--broker {args.broker!r}: expected HOST[:PORT]")
        changes["broker"] = config.broker.model_copy(update={"host": host, "port": int(port)})
    return config.model_copy(update=changes) if changes else config


def run(args: argparse.Namespace) -> int:
    """The ``server`` command; returns the exit code."""
    try:
        from .config import ConfigError
        from .db import DatabaseError
    except ImportError as exc:
        print(
            f"edge-fleet server: the server extra is not installed ({exc.name} missing): "
            'pip install "edge-deploy[server]"',
            file=sys.stderr,
        )
        return EXIT_ERROR
    from .server import ServerError

    try:
        config = server_config(args)
        if args.server_command == "token":
            return _tokens(config, args)
        if args.server_command == "migrate":
            return _migrate(config)
        return _serve(config, verbose=args.verbose)
    except (ConfigError, ValueError) as exc:
        _fail(exc)
        return EXIT_USAGE
    except (DatabaseError, ServerError) as exc:
        _fail(exc)
        return EXIT_ERROR


def _fail(exc: Exception) -> None:
    # One line: a driver's error (psycopg's "connection refused") spans several.
    print("edge-fleet server: " + " ".join(str(exc).split()), file=sys.stderr)


def _serve(config: ServerConfig, verbose: bool) -> int:
    from . import logs
    from .server import FleetServer

    logs.setup(config.log_format, logging.DEBUG if verbose else logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = FleetServer(config)
    server.start()
    try:
        while not stop.wait(1.0):
            if not server.healthy():
                log.error("a part of the server died: %s; stopping", server.problem())
                server.stop()
                return EXIT_ERROR
    finally:
        server.stop()
    return EXIT_OK


def _migrate(config: ServerConfig) -> int:
    from .server import open_database

    open_database(config).close()
    print("database is at the newest schema")
    return EXIT_OK


def _tokens(config: ServerConfig, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from .auth import AuthError, create_token, revoke_token
    from .db.schema import ApiToken
    from .server import open_database

    database = open_database(config)
    try:
        with database.session() as s:
            if args.token_command == "add":
                try:
                    print(create_token(s, args.name, args.role))
                except AuthError as exc:
                    raise ValueError(str(exc)) from None
            elif args.token_command == "revoke":
                try:
                    revoke_token(s, args.name)
                except AuthError as exc:
                    raise ValueError(str(exc)) from None
            else:
                rows = s.scalars(select(ApiToken).order_by(ApiToken.name)).all()
                for row in rows:
                    fields = {"name": row.name, "role": row.role, "revoked": row.revoked}
                    print(json.dumps(fields))
    finally:
        database.close()
    return EXIT_OK


__all__ = ["add_parser", "run"]
