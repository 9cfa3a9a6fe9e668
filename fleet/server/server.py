"""``FleetServer``: the parts of one server process, wired and started in order.

database (migrated) -> artifact store -> MQTT link (``Console``, replies and
telemetry through a shared subscription) -> ingest -> artifact delivery ->
reconciler (acts only while it holds the lease) -> HTTP API (uvicorn, in a thread).
Stopped in the reverse order. The process keeps no state of its own: everything is in
the database and the broker, so several processes can run against one PostgreSQL and
one (clustered) broker, and any of them can be killed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from agent.models.manifest import BundleError, load_public_key

from ..console import BrokerOptions, Console, ConsoleError
from ..serve import parse_bind
from ..signing import CommandSigner
from .app import create_app
from .artifacts import ArtifactStore
from .auth import AuthError, create_token
from .config import ServerConfig
from .context import ServerContext
from .db import Database, default_url
from .db.schema import ApiToken
from .delivery import ArtifactDelivery
from .ingest import Ingest
from .reconcile import Reconciler

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"


class ServerError(Exception):
    """The server cannot start; one line naming the cause."""


def open_database(config: ServerConfig) -> Database:
    database = Database(config.db or default_url(config.data_dir))
    database.migrate()
    return database


def broker_options(config: ServerConfig) -> BrokerOptions:
    b = config.broker
    password = None
    if b.password_file is not None:
        try:
            password = b.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ServerError(f"broker.password_file: {exc}") from None
    return BrokerOptions(
        host=b.host,
        port=b.port,
        prefix=b.prefix,
        tls=b.tls,
        cafile=b.cafile,
        certfile=b.certfile,
        keyfile=b.keyfile,
        username=b.username,
        password=password,
    )


class FleetServer:
    """One server process. ``start`` returns once the API listens; ``stop`` is prompt."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.instance = config.instance or f"{socket.gethostname()}:{os.getpid()}"
        self.database: Database | None = None
        self.console: Console | None = None
        self.ingest: Ingest | None = None
        self.delivery: ArtifactDelivery | None = None
        self.reconciler: Reconciler | None = None
        self.url = ""
        self._http: uvicorn.Server | None = None
        self._app: FastAPI | None = None
        self._http_thread: threading.Thread | None = None
        self._started_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        c = self.config
        self._started_at = self.clock()
        keys = self._keys()
        signer = self._signer()
        self.database = open_database(c)
        store = ArtifactStore(c.artifacts.dir or c.data_dir / "artifacts")
        store.open()
        self._bootstrap_token()
        console = Console(broker_options(c), signer=signer, share_group=c.broker.share_group)
        try:
            console.connect()
        except ConsoleError as exc:
            raise ServerError(str(exc)) from None
        self.console = console
        self.ingest = Ingest(self.database, console.events, retention=c.retention)
        self.ingest.start()
        sock = self._bind()
        self.url = self._public_url(sock, console)
        self.delivery = ArtifactDelivery(
            c.artifacts, store, public_url=self.url, link=console, topics=console.topics
        )
        self.reconciler = Reconciler(
            self.database, console, self.delivery, c.reconcile, instance=self.instance
        )
        self.reconciler.start()
        context = ServerContext(
            config=c,
            database=self.database,
            store=store,
            trusted_keys=keys,
            sender=console,
            clock=self.clock,
            figures=self.figures,
        )
        self._app = create_app(context)
        self._serve_http(self._app, sock)
        log.info(
            "fleet server %s: API on %s, broker %s, database %s",
            self.instance,
            self.url,
            console.options.url,
            self.database.safe_url,
        )

    def stop(self) -> None:
        if self._app is not None:
            self._app.state.stopping.set()  # ends the dashboard's event streams
        if self._http is not None:
            self._http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(10)
            self._http_thread = None
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.delivery is not None:
            self.delivery.close()
        if self.ingest is not None:
            self.ingest.stop()
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.database is not None:
            self.database.close()
        log.info("fleet server %s stopped", self.instance)

    def healthy(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """What is wrong with a part that must run, or None."""
        if self._http_thread is not None and not self._http_thread.is_alive():
            return "the HTTP server stopped"
        for name, part in (("ingest", self.ingest), ("reconciler", self.reconciler)):
            if part is not None and not part.alive():
                return f"the {name} thread died"
        return None

    def figures(self) -> dict[str, Any]:
        """Numbers for /metrics and /healthz: ``ingest_*`` (per-kind counts flattened to
        ``ingest_<count>_<kind>``) and the reconciler's own ``reconcile*`` names."""
        out: dict[str, Any] = {"uptime_s": round(self.clock() - self._started_at, 1)}
        if self.ingest is not None:
            for name, value in self.ingest.figures().items():
                if isinstance(value, dict):
                    out.update({f"ingest_{name}_{k}": v for k, v in value.items()})
                else:
                    out[f"ingest_{name}"] = value
        if self.reconciler is not None:
            out.update(self.reconciler.figures())
        return out

    # ------------------------------------------------------------------ parts

    def _keys(self) -> list[Any]:
        keys = []
        for path in self.config.trusted_keys:
            try:
                keys.append(load_public_key(path))
            except BundleError as exc:
                raise ServerError(f"trusted_keys: {exc}") from None
        if self.config.require_signature and not keys:
            # Started with no setup: everything works but uploads, which say why.
            log.warning(
                "trusted_keys is empty and require_signature is true: every bundle upload "
                "is refused until the fleet's signing.pub is configured"
            )
        return keys

    def _signer(self) -> CommandSigner | None:
        if self.config.command_key is None:
            return None
        try:
            return CommandSigner.from_file(self.config.command_key)
        except BundleError as exc:
            raise ServerError(f"command_key: {exc}") from None

    def _bootstrap_token(self) -> None:
        """With no token at all, make an operator token ``admin`` and leave it in the data
        directory (mode 0600), so a server started with no setup can be used at once."""
        assert self.database is not None
        path = self.config.data_dir / ADMIN_TOKEN_FILE
        try:
            with self.database.session() as s:
                if s.scalar(select(func.count()).select_from(ApiToken)):
                    return
                token = create_token(s, "admin", "operator")
                # The INSERT now, before the file: a process starting at the same moment
                # on the same database may have made 'admin' (its unique name) already.
                s.flush()
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(token + "\n")
        except (AuthError, IntegrityError):
            log.info("the operator token 'admin' was made by another server process")
            return
        log.warning("no API tokens yet: made the operator token 'admin' in %s", path)

    def _bind(self) -> socket.socket:
        try:
            host, port = parse_bind(self.config.http.bind, "127.0.0.1")
        except ValueError as exc:
            raise ServerError(f"http.bind: {exc}") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(128)
        return sock

    def _public_url(self, sock: socket.socket, console: Console) -> str:
        if self.config.http.public_url:
            return self.config.http.public_url.rstrip("/")
        host, port = sock.getsockname()[:2]
        # A wildcard bind is no address for devices: the one that reaches the broker is.
        if host in ("0.0.0.0", "::"):
            host = console.local_address()
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _serve_http(self, app: Any, sock: socket.socket) -> None:
        config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False)
        self._http = uvicorn.Server(config)
        self._http_thread = threading.Thread(
            target=self._http.run, kwargs={"sockets": [sock]}, name="http-api", daemon=True
        )
        self._http_thread.start()
        deadline = time.monotonic() + 10
        while not self._http.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise ServerError("the HTTP API did not start")
            time.sleep(0.02)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir
