"""The dashboard in a real Chromium: the browser, a server with devices, and logging in.

Playwright for Python drives the system's Chromium (``/usr/bin/chromium``, Debian's
``chromium`` package, which ``make setup`` installs when missing; the environment
variable ``EDGE_TEST_CHROMIUM`` names another executable). Playwright never downloads a
browser here: ``PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD`` is set, and every launch names the
executable. Each launch runs in a fresh temporary profile (Playwright's own, removed
when the browser closes).

``Dashboard`` is a real ``edge-fleet server`` (SQLite, its own data directory) on a
real Mosquitto, with a signing key its trusted keys hold; simulated devices
(``fleet.sim.SimFleet``) are started against the same broker by the tests. Used by
tests/server/test_dashboard.py, tests/server/screenshots.py and benchmarks/dashboard.py.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, Playwright, ViewportSize, sync_playwright
from sqlalchemy import insert

from fleet.client import ServerClient
from fleet.server.auth import Role, create_token
from fleet.server.db import Database
from fleet.server.db.schema import Device, DeviceGroup, DeviceModel
from tests.fleet_support import Keys, make_bundle, make_keys
from tests.mqtt_support import Broker
from tests.server.server_support import ServerProcess

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

CHROMIUM_ENV = "EDGE_TEST_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# --no-sandbox: the tests run as root in containers, where Chromium's sandbox cannot
# start; the rest keeps the browser from reaching out (updates, sync, first-run pages).
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}


def chromium_executable() -> str:
    """The Chromium to drive; a clear error when there is none."""
    path = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"no Chromium at {path}: run `make setup` (installs Debian's chromium as root) "
            f"or set {CHROMIUM_ENV} to a Chromium executable"
        )
    return path


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=chromium_executable(), args=LAUNCH_ARGS)


@contextmanager
def chromium() -> Iterator[Browser]:
    """Playwright and one Chromium, both stopped at the end."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


def login(page: Page, base_url: str, token: str) -> None:
    """The login form, as a person fills it in; leaves the page where the server sent it."""
    page.goto(base_url + "/login")
    page.locator("input#token").fill(token)
    with page.expect_navigation():
        page.locator("form", has=page.locator("input#token")).locator("button[type=submit]").click()


# ------------------------------------------------------------------------- the server


class Dashboard:
    """A real ``edge-fleet server`` with SQLite, on ``broker`` under ``prefix``."""

    def __init__(self, workdir: Path, broker: Broker, prefix: str) -> None:
        self.workdir = workdir
        self.broker = broker
        self.prefix = prefix
        self.keys: Keys = make_keys(workdir / "keys")
        self.db_url = f"sqlite:///{workdir / 'fleet.db'}"
        self.server = ServerProcess(
            workdir / "server", broker, db=self.db_url, prefix=prefix,
            trusted_keys=[self.keys.public],
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        assert self.server.token, "the server made no admin token"
        return self.server.token

    def start(self) -> Dashboard:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.kill()

    def api(self) -> ServerClient:
        return ServerClient(self.url, self.token)

    def add_token(self, name: str, role: Role = "read") -> str:
        """A new token, made as ``edge-fleet server token add`` makes it."""
        database = Database(self.db_url)
        try:
            with database.session() as s:
                return create_token(s, name, role)
        finally:
            database.close()

    def upload_bundle(self, version: str, name: str = "digits") -> dict[str, Any]:
        """A small signed bundle of ``name`` ``version``, uploaded through the API."""
        bundle = make_bundle(
            self.workdir / "bundles" / f"{name}-{version}", os.urandom(3000),
            version=version, keys=self.keys, name=name,
        )  # fmt: skip
        return self.api().upload_bundle(bundle)


# ------------------------------------------------------------- many devices, at once


def seed_devices(
    db_url: str, count: int, *, prefix: str = "dev", now: float | None = None, seed: int = 16
) -> dict[str, int]:
    """``count`` devices written straight into a migrated database, as ingest would
    leave them (much faster than 10,000 simulated devices coming online over MQTT).

    Ids ``<prefix>-00000``...; groups north / south alternately; every 10th offline,
    every 25th (of the others) degraded; digits 1 on a third, 2 on the rest. Returns
    the counts by status, group and version, for the tests' expectations.
    """
    now = time.time() if now is None else now
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    devices, groups, models = [], [], []
    for i in range(count):
        device_id = f"{prefix}-{i:05d}"
        status = "offline" if i % 10 == 0 else "degraded" if i % 25 == 0 else "ok"
        group = "north" if i % 2 == 0 else "south"
        version = "1" if i % 3 == 0 else "2"
        for key in (status, group, f"v{version}"):
            counts[key] = counts.get(key, 0) + 1
        online = status != "offline"
        devices.append(
            {
                "id": device_id,
                "first_seen": now - 86_400,
                "last_seen": now - (3600 if not online else rng.uniform(0, 5)),
                "online": online,
                "status": status,
                "protocol": 1,
                "agent_version": "0.1.0",
                "runtime": "simulated 0",
                "groups": [group],
                "state_ts": now - 60,
                "fps": round(rng.uniform(10, 30), 1) if online else None,
                "invoke_p95_ms": round(rng.uniform(3, 9), 2) if online else None,
            }
        )
        groups.append({"device_id": device_id, "group": group})
        models.append(
            {
                "device_id": device_id,
                "model": "digits",
                "active": version,
                "last_known_good": version,
                "status": "degraded" if status == "degraded" else "serving",
                "versions": ["1", "2"] if version == "2" else ["1"],
            }
        )
    database = Database(db_url)
    try:
        database.migrate()
        with database.session() as s:
            s.execute(insert(Device), devices)
            s.execute(insert(DeviceGroup), groups)
            s.execute(insert(DeviceModel), models)
    finally:
        database.close()
    return counts
