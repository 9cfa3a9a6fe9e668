"""The fleet server's HTTP API on a real uvicorn, in a thread, for the API and CLI tests.

``ApiServer`` runs ``create_app`` over a migrated database, an artifact store in a
temporary directory, a trusted key pair, and a ``RecordingSender`` in place of the
MQTT link (it records every command it is given; ``refuse`` makes it fail as a
broker that does not take a publish).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from agent.models.manifest import load_public_key
from agent.protocol import Command
from fleet.console import ConsoleError
from fleet.server.app import create_app
from fleet.server.artifacts import ArtifactStore
from fleet.server.auth import create_token
from fleet.server.config import HttpConfig, ServerConfig
from fleet.server.context import ServerContext
from fleet.server.db import Database
from fleet.server.db.schema import Device, DeviceGroup, DeviceModel
from tests.fleet_support import Keys, make_keys
from tests.mqtt_support import free_port


@dataclass
class RecordingSender:
    sent: list[tuple[str, Command]] = field(default_factory=list)
    refuse: bool = False

    def send(self, device: str, command: Command, timeout: float = 10.0) -> None:
        if self.refuse:
            raise ConsoleError("broker refused the publish (test)")
        self.sent.append((device, command))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def detail(self) -> str:
        detail = self.json()["detail"]
        assert isinstance(detail, str)
        return detail


class ApiServer:
    def __init__(self, database: Database, directory: Path, max_upload_mb: float = 1.0) -> None:
        self.database = database
        self.keys: Keys = make_keys(directory / "keys")
        self.store = ArtifactStore(directory / "artifacts")
        self.store.open()
        self.sender = RecordingSender()
        self.figures: dict[str, Any] = {"ingest_msgs_per_s": 12.5, "reconcile_lag_s": 0.25}
        self.ctx = ServerContext(
            config=ServerConfig(data_dir=directory, http=HttpConfig(max_upload_mb=max_upload_mb)),
            database=database,
            store=self.store,
            trusted_keys=[load_public_key(self.keys.public)],
            sender=self.sender,
            figures=lambda: self.figures,
        )
        self.app = create_app(self.ctx)
        with database.session() as s:
            self.operator = create_token(s, "ops", "operator")
            self.reader = create_token(s, "viewer", "read")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, name="test-api", daemon=True)

    def start(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.app.state.stopping.set()
        self._server.should_exit = True
        self._thread.join(10)

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        data: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; the answer is read even when the server gives it before the
        body is all sent (an upload refused as too large). An iterable ``data`` is
        sent chunked, with no Content-Length."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            try:
                conn.request(
                    method, path, data, all_headers, encode_chunked=not isinstance(data, bytes)
                )
            except (BrokenPipeError, ConnectionResetError):
                pass
            r = conn.getresponse()
            return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()


def add_device(
    database: Database,
    device: str,
    *,
    online: bool = True,
    status: str = "ok",
    groups: tuple[str, ...] = (),
    models: dict[str, str | None] | None = None,
    fps: float | None = None,
    p95: float | None = None,
    last_seen: float = 1_000_000.0,
) -> None:
    """A device row as ingest would leave it (with its groups and models)."""
    models = models or {}
    with database.session() as s:
        s.add(
            Device(
                id=device,
                first_seen=last_seen - 100,
                last_seen=last_seen,
                online=online,
                status=status,
                protocol=1,
                agent_version="0.9.0",
                groups=list(groups),
                state={
                    "device": device,
                    "online": online,
                    "models": [
                        {"name": n, "active": v, "status": "serving"} for n, v in models.items()
                    ],
                    "pipelines": [{"name": "door", "model": "digits", "status": "running"}],
                },
                fps=fps,
                invoke_p95_ms=p95,
            )
        )
        s.flush()
        for g in groups:
            s.add(DeviceGroup(device_id=device, group=g))
        for name, version in models.items():
            s.add(
                DeviceModel(
                    device_id=device,
                    model=name,
                    active=version,
                    status="serving",
                    versions=[version] if version else [],
                )
            )
