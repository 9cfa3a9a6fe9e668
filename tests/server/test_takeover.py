"""Two ``edge-fleet server`` processes on one PostgreSQL and one broker: one is killed
mid-rollout and the other takes over the reconciler and finishes it.

Set up as a real two-server deployment is (docs/scaling.md, "Several fleet-server
processes"): one database, one broker, one shared ``artifacts.dir`` (an upload to
either process is stored where both find it), and model files delivered by URL from
an object store that mirrors that directory (here a plain HTTP server over it), so a
device's download does not depend on the process that sent its command. Devices are
``fleet.sim.SimFleet``s that really fetch the artifact and count every command they run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleet.client import ServerClient
from fleet.server.db import Database
from fleet.server.db.schema import CommandRecord, Lease, ReplyRecord, TelemetryMinute
from fleet.server.reconcile import LEASE_NAME
from fleet.sim import SimFleet
from tests.fleet_support import make_bundle, make_keys
from tests.mqtt_support import Broker
from tests.server.conftest import PostgresServer
from tests.server.server_support import ServerProcess, wait_until

pytestmark = pytest.mark.timeout(180)

PREFIX = "takeover"
MODEL = bytes(range(256)) * 40
LEASE_S = 3.0
DOOR = [f"cam-{i}" for i in range(6)]  # the rollout's group: 3 waves of 2
LAB = [f"tele-{i}" for i in range(4)]  # telemetry only


class ObjectStore:
    """Static files over HTTP from the shared artifact directory, as a bucket or CDN
    mirroring it would serve them (``artifacts.delivery: url``). Downloads past the
    first ``free`` wait for ``gate``: the test holds deploys in flight with it."""

    def __init__(self, directory: Path, free: int) -> None:
        self.gate = threading.Event()
        self.free = free
        self.waiting = 0
        self._lock = threading.Lock()
        self._served = 0
        store = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, directory=str(directory), **kw)

            def do_GET(self) -> None:
                store.hold()
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="object-store", daemon=True
        )

    def hold(self) -> None:
        with self._lock:
            self._served += 1
            held = self._served > self.free
            self.waiting += int(held)
        if held:
            self.gate.wait(60)
            with self._lock:
                self.waiting -= 1

    def start(self) -> ObjectStore:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


def health(server: ServerProcess) -> dict[str, Any]:
    answer: dict[str, Any] = server.get("/healthz")
    return answer


def samples(database: Database, devices: list[str]) -> int:
    """Telemetry messages counted in the device-wide minute rows of ``devices``."""
    with database.session() as s:
        query = select(func.coalesce(func.sum(TelemetryMinute.samples), 0)).where(
            TelemetryMinute.pipeline == "", TelemetryMinute.device_id.in_(devices)
        )
        return int(s.scalar(query) or 0)


def lease_holder(database: Database) -> str | None:
    with database.session() as s:
        row = s.get(Lease, LEASE_NAME)
        return row.holder if row is not None else None


def commands_by_device(database: Database, rollout_id: str) -> dict[str, list[str]]:
    with database.session() as s:
        rows = s.execute(
            select(CommandRecord.device_id, CommandRecord.id)
            .where(CommandRecord.rollout_id == rollout_id)
            .order_by(CommandRecord.created_at)
        ).all()
    out: dict[str, list[str]] = {}
    for device, cid in rows:
        out.setdefault(device, []).append(cid)
    return out


def test_a_server_takes_over_the_reconciler_from_a_killed_one(
    postgres: PostgresServer, broker: Broker, tmp_path: Path
) -> None:
    url = postgres.fresh()
    keys = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "bundle", MODEL, version="2", keys=keys)
    shared = tmp_path / "shared-artifacts"
    shared.mkdir()
    store = ObjectStore(shared, free=2).start()  # the first wave's downloads
    artifacts = {"dir": str(shared), "delivery": "url", "base_url": store.url}
    servers = {
        name: ServerProcess(
            tmp_path / name,
            broker,
            db=url,
            prefix=PREFIX,
            instance=name,
            trusted_keys=[keys.public],
            reconcile={"lease_s": LEASE_S},
            extra={"artifacts": artifacts},
        )
        for name in ("a", "b")
    }
    lab = SimFleet(
        broker.host, broker.port, prefix=PREFIX, devices=LAB, groups=["lab"],
        per_connection=2, interval_s=0.05,
    )  # fmt: skip
    door = SimFleet(
        broker.host, broker.port, prefix=PREFIX, devices=DOOR, groups=["door"],
        per_connection=1, interval_s=60.0, step_delay_s=0.2, fetch_artifacts=True,
        fetch_timeout_s=90.0,
    )  # fmt: skip
    database = Database(url)
    try:
        # Both at once, as a deployment's replicas start: one migrates the database and
        # makes the admin token (in its data directory), the other waits for it.
        starting = [threading.Thread(target=s.start, name=f"start-{n}") for n, s in servers.items()]
        for t in starting:
            t.start()
        for t in starting:
            t.join(60)
        tokens = {s.token for s in servers.values()} - {None}
        assert len(tokens) == 1, "one admin token, made by one of the two"
        for s in servers.values():
            assert s.proc is not None and s.proc.poll() is None, s.tail()
            s.token = next(iter(tokens))
        wait_until(
            lambda: sum(health(s)["reconciler_active"] for s in servers.values()) == 1,
            30,
            "one of the two processes reconciling",
        )

        # --- both ingest, through the shared subscription: every message once.
        lab.start()
        wait_until(lambda: lab.sent_telemetry >= 200, 30, "telemetry sent")
        lab.stop()
        sent = lab.sent_telemetry

        def received() -> list[int]:
            return [int(health(s).get("ingest_received_telemetry", 0)) for s in servers.values()]

        wait_until(lambda: sum(received()) >= sent, 30, f"{sent} telemetry messages received")
        wait_until(lambda: samples(database, LAB) >= sent, 30, f"{sent} samples written")
        split = received()
        assert sum(split) == sent, split
        assert all(n > 0 for n in split), f"one process got all telemetry: {split}"
        assert samples(database, LAB) == sent

        # --- a rollout in three waves, created through the API (the upload to one
        # process, the rollout through the other: they share everything).
        door.start()
        client_a = ServerClient(servers["a"].url, servers["a"].token)
        client_b = ServerClient(servers["b"].url, servers["b"].token)
        wait_until(
            lambda: client_b.devices(group="door", online=True)["total"] == len(DOOR),
            30,
            "the door devices online in the inventory",
        )
        client_a.upload_bundle(bundle)
        rollout = client_b.create_rollout(
            {"model": "digits", "version": "2", "group": "door", "waves": 3}
        )
        rid = rollout["id"]

        active = {n: health(s)["reconciler_active"] for n, s in servers.items()}
        holder_name = next(n for n, on in active.items() if on)
        assert list(active.values()).count(1) == 1, active
        assert lease_holder(database) == holder_name
        survivor_name = "b" if holder_name == "a" else "a"
        holder, survivor = servers[holder_name], servers[survivor_name]

        # --- kill the holder once the first wave is done and the second one's downloads
        # are held (their deploys in flight), so the survivor finds commands in flight.
        def mid_rollout() -> bool:
            installed = [d for d in DOOR if door.installed(d)]
            return len(installed) == 2 and store.waiting == 2

        wait_until(mid_rollout, 60, "the first wave done and the second one downloading")
        in_flight = [d for d in DOOR if door.deploys(d) and not door.installed(d)]
        assert len(in_flight) == 2, in_flight
        holder.kill()  # SIGKILL: no lease release, no goodbye to the broker
        killed_at = time.monotonic()

        wait_until(
            lambda: health(survivor)["reconciler_active"] == 1,
            30,
            "the survivor holding the reconciler lease",
            interval=0.05,
        )
        takeover_s = time.monotonic() - killed_at
        print(f"\nreconciler takeover after SIGKILL: {takeover_s:.1f}s (lease_s {LEASE_S})")
        assert lease_holder(database) == survivor_name
        figures = health(survivor)
        assert figures["reconciler_takeovers_total"] == 1
        # Some ticks of the new holder while the deploys are still in flight: it follows
        # the commands it found, and sends nothing new to those devices.
        ticks = figures["reconcile_ticks_total"]
        wait_until(
            lambda: health(survivor)["reconcile_ticks_total"] >= ticks + 5, 30, "five more ticks"
        )
        assert store.waiting == 2 and not any(door.installed(d) for d in in_flight)
        store.gate.set()

        client_s = ServerClient(survivor.url, survivor.token)
        wait_until(lambda: client_s.rollout(rid)["state"] == "done", 60, "the rollout done")

        # --- every device on the new version, each by exactly one deploy command.
        view = client_s.rollout(rid)
        assert {d["device"]: d["status"] for d in view["devices"]} == dict.fromkeys(DOOR, "done")
        commands = commands_by_device(database, rid)
        for device in DOOR:
            assert door.active(device) == "2", device
            assert door.installed(device) == ["digits 2"], device
            assert door.deploys(device) == 1, (device, door.runs(device))
            assert list(door.runs(device).values()) == [1], (device, door.runs(device))
            # One command id recorded and sent per device: none after the takeover for
            # the devices whose deploy was in flight when the holder died.
            assert commands.get(device) == list(door.runs(device)), (device, commands)
        # The survivor published the two commands in flight once more under their ids
        # (replies sent while no process listened would be lost otherwise): the devices
        # answered `duplicate` and ran nothing twice (above).
        with database.session() as s:
            duplicates = s.scalars(
                select(ReplyRecord.device_id).where(ReplyRecord.code == "duplicate")
            ).all()
        assert sorted(set(duplicates)) == sorted(in_flight), duplicates
    finally:
        for s in servers.values():
            s.kill()
        lab.stop()
        door.stop()
        store.stop()
        database.close()
