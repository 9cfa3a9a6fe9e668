"""The fleet server at scale: a real ``edge-fleet server`` process per database.

    python -m benchmarks.fleet_server [--quick] --json [--devices N] [--duration S]
                                      [--rate R] [--db sqlite,postgresql]

Per database (SQLite in a temp dir, then PostgreSQL in a fresh database on
127.0.0.1:5432, said as ``skipped`` when none answers): one private Mosquitto, one
``python -m fleet server --config <tmp yaml>`` process (defaults but for its data
directory, database, broker, port and the bundle's public key), and
``fleet.sim.SimFleet`` in a child process (the devices' side, as another machine
would be) sending telemetry from N devices. Phases, all while the telemetry flows:

1. start: every device online in the API (``GET /api/devices?online=true``), then
   ingest caught up with the start's states and telemetry;
2. the API window (``--duration``), telemetry at 1,000 msgs/s (``API_RATE``: what the
   server must sustain): one client times the device list (``GET
   /api/devices?limit=100`` with several sorts and filters) and one device's telemetry
   series (``GET /api/devices/{id}/telemetry``), in turn with a short pause, as a
   dashboard would;
3. the ingest window (``--duration``), telemetry at ``--rate`` (2,000 msgs/s): written
   per second, from the server's ``/healthz`` figures, with the same client probing;
4. reconcile: a signed bundle of version 2 uploaded (``POST /api/bundles``), a rollout
   of the group of all devices (``POST /api/rollouts``, no canary, one wave), then
   the time until every device runs version 2, both in the simulator (``.active()``)
   and in the API (``GET /api/devices?model=digits&version=2``);
5. the simulator stops (every device says offline, its telemetry delivered), ingest
   drains, and the device-wide ``telemetry_minutes`` rows are summed from the database.

Figures per database:

- ``devices``; ``telemetry_msgs_per_s`` (written over the window) beside
  ``offered_msgs_per_s`` (sent over the same window); ``ingest_lag_s`` (largest age of
  the oldest unwritten event over the window) and its median ``ingest_lag_p50_s``;
- ``sent``, ``ingested`` (the device-wide ``telemetry_minutes.samples``, summed) and
  ``lost`` = sent - ingested: every message sent is in the database, or counted lost;
- ``reconcile_s``: rollout created to every device on version 2 in the simulator and
  in the API (``reconcile_sim_s``, ``reconcile_api_s`` each), ``all_reached``,
  ``rollout_state`` when it ended, ``deploys_run`` (deploys the devices executed:
  ``devices`` when none was deployed twice);
- ``api_p95_ms``: the larger of the two queries' p95 in the API window (``api_ms``
  per query: p50, p95, max, count; ``api_ingest_msgs_per_s`` the ingest meanwhile),
  and ``api_p95_ms_at_offered`` / ``api_ms_at_offered`` in the ingest window;
  ``api_errors``;
- ``server_rss_mb``: the server process's peak resident memory (``VmHWM``) and
  ``server_rss_now_mb`` (``VmRSS`` at the end); ``server_stop_s`` (SIGTERM to exit).

Across databases, ``ratios`` (PostgreSQL / SQLite) of ingest, reconcile and API p95.
``targets`` checks issue 15's figures for ``--quick`` (all devices reach the version,
nothing lost, >= 1,000 telemetry msgs/s on PostgreSQL, API p95 <= 100 ms).

``--quick``: 1,000 devices, 15 s windows; otherwise 10,000 devices (or as many as
half the machine's available memory holds, said as ``devices_requested``/``devices``),
60 s. Exit status 1 when a database's run broke (``errors``), lost telemetry, or left
a device off the version.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from benchmarks._server_harness import (
    GROUP,
    MODEL,
    FreshPostgres,
    ServerProcess,
    SimChild,
    device_ids,
    signed_bundle,
)
from fleet.client import ServerClient, ServerError
from fleet.server.db import Database
from fleet.server.db.schema import TelemetryMinute
from tests.mqtt_support import Broker

OFFERED_PER_S = 2000.0  # well over the 1,000 msgs/s the server must sustain
# The API's latency is stated while ingest runs at the rate the server must sustain
# (issue 15), and again at the offered rate.
API_RATE = 1000.0
POSTGRES_ENV = "EDGE_BENCH_POSTGRES"
KEEP_ENV = "FLEET_SERVER_BENCH_KEEP_WORKDIR"  # the servers' logs and configs, for a post-mortem
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DATABASES = ("sqlite", "postgresql")
# A simulated device costs well under this much memory (its state, timers, paho share).
DEVICE_MB = 0.05
SAMPLE_S = 0.25
SETTLED_LAG_S = 0.5
API_PAUSE_S = 0.05  # between two API requests of the one dashboard client
NEW_VERSION = "2"
# The device list as a dashboard asks for it: sorts and filters over the fleet.
DEVICE_QUERIES: tuple[dict[str, Any], ...] = (
    {"sort": "id"},
    {"sort": "-last_seen"},
    {"sort": "-fps", "online": True},
    {"sort": "-invoke_p95_ms", "group": GROUP},
    {"sort": "status", "status": "ok"},
    {"sort": "id", "q": "bench-00"},
    {"sort": "-id", "model": MODEL, "version": "1"},
    {"sort": "id", "offset": 500},
)

log = logging.getLogger(__name__)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------ the API while ingesting


class ApiProbe:
    """One dashboard client in a thread: the device list and one device's telemetry in
    turn, each request timed, until stopped."""

    def __init__(self, client: ServerClient, devices: int) -> None:
        self.client = client
        self.ids = device_ids(min(devices, 50))
        self.times: dict[str, list[float]] = {"devices": [], "telemetry": []}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            query = DEVICE_QUERIES[n % len(DEVICE_QUERIES)]
            self._time("devices", functools.partial(self.client.devices, limit=100, **query))
            device = self.ids[n % len(self.ids)]
            self._time("telemetry", functools.partial(self.client.telemetry, device))
            n += 1
            self._stop.wait(API_PAUSE_S)

    def _time(self, kind: str, call: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            call()
        except ServerError as exc:
            self.errors.append(f"{kind}: {exc}")
            return
        self.times[kind].append((time.perf_counter() - started) * 1000)

    def figures(self) -> dict[str, Any]:
        per_kind = {
            kind: {
                "count": len(t),
                "p50": round(statistics.median(t), 1),
                "p95": round(percentile(t, 0.95), 1),
                "max": round(max(t), 1),
            }
            for kind, t in self.times.items()
            if t
        }
        p95s = [k["p95"] for k in per_kind.values()]
        return {
            "api_p95_ms": max(p95s) if len(p95s) == len(self.times) else None,
            "api_ms": per_kind,
            "api_errors": len(self.errors),
            "api_first_error": self.errors[0] if self.errors else None,
        }


# ------------------------------------------------------------------ phases


def window(
    server: ServerProcess, fleet: SimChild, probe: ApiProbe, duration_s: float
) -> dict[str, Any]:
    """Telemetry written and sent per second over ``duration_s``, with the API probed."""
    probe.start()
    try:
        before, sent_before, t0 = server.health(), fleet.sent(), time.monotonic()
        lags: list[float] = []
        while time.monotonic() - t0 < duration_s:
            lags.append(float(server.health().get("ingest_lag_s", 0.0)))
            time.sleep(SAMPLE_S)
        after, sent_after, t1 = server.health(), fleet.sent(), time.monotonic()
    finally:
        probe.stop()
    elapsed = t1 - t0
    return {
        "telemetry_msgs_per_s": round((_written(after) - _written(before)) / elapsed, 1),
        "offered_msgs_per_s": round((sent_after - sent_before) / elapsed, 1),
        "ingest_lag_s": round(max(lags), 3) if lags else None,
        "ingest_lag_p50_s": round(statistics.median(lags), 3) if lags else None,
        "window_s": round(elapsed, 1),
        **probe.figures(),
    }


def settle(server: ServerProcess, duration_s: float) -> None:
    """The timers settle into their phases and ingest catches up with what came before,
    so a window measures the steady rate."""
    time.sleep(min(3.0, duration_s / 5))
    wait_until(lambda: float(server.health()["ingest_lag_s"]) < SETTLED_LAG_S, 120)


def reconcile(
    server: ServerProcess, client: ServerClient, fleet: SimChild, bundle: Path, devices: int
) -> dict[str, Any]:
    """Upload version 2, roll it out to the group of all devices, time until all run it."""
    client.upload_bundle(bundle)
    started = time.monotonic()
    rollout = client.create_rollout({"model": MODEL, "version": NEW_VERSION, "group": GROUP})
    reached: dict[str, float] = {}
    counts = {"sim": 0, "api": 0}
    deadline = started + 120 + devices * 0.05
    while len(reached) < 2 and time.monotonic() < deadline:
        if "sim" not in reached:
            counts["sim"] = fleet.active(NEW_VERSION)
        if "api" not in reached:
            page = client.devices(model=MODEL, version=NEW_VERSION, limit=1)
            counts["api"] = int(page["total"])
        for side, n in counts.items():
            if n >= devices and side not in reached:
                reached[side] = time.monotonic() - started
        time.sleep(0.2)
    # The rollout ends on the reconciler's next tick after the last device.
    state = ""
    for _ in range(50):
        state = client.rollout(rollout["id"])["state"]
        if state != "running":
            break
        time.sleep(0.2)
    all_reached = len(reached) == 2
    figures = server.health()
    return {
        "reconcile_s": round(max(reached.values()), 2) if all_reached else None,
        "reconcile_sim_s": round(reached["sim"], 2) if "sim" in reached else None,
        "reconcile_api_s": round(reached["api"], 2) if "api" in reached else None,
        "all_reached": all_reached,
        "reached_sim": counts["sim"],
        "reached_api": counts["api"],
        "rollout_state": state,
        "deploys_sent": int(figures.get("reconcile_commands_total", 0)),
        "deploys_run": fleet.deploys(),
    }


def ingested_samples(url: str) -> int:
    """Telemetry messages in the database: the device-wide minute rows' samples, summed."""
    database = Database(url)
    try:
        with database.session() as s:
            query = select(func.coalesce(func.sum(TelemetryMinute.samples), 0)).where(
                TelemetryMinute.pipeline == ""
            )
            return int(s.scalar(query) or 0)
    finally:
        database.close()


def _written(health: dict[str, Any]) -> int:
    return int(health.get("ingest_written_telemetry", 0))


def _drained(server: ServerProcess, sent: int) -> bool:
    h = server.health()
    return _written(h) >= sent and not h.get("ingest_held") and not h.get("ingest_queue_depth")


# ------------------------------------------------------------------ one database


def measure(
    kind: str, url: str, devices: int, duration_s: float, rate: float, work: Path
) -> dict[str, Any]:
    interval_s = devices / rate
    api_rate = min(rate, API_RATE)
    bundle, public_key = signed_bundle(work / f"bundle-{kind}", NEW_VERSION)
    broker = Broker(work / f"mosquitto-{kind}")
    broker.start()
    server = ServerProcess(work / f"server-{kind}", broker, url, public_key)
    fleet = SimChild(broker, devices, devices / api_rate)
    try:
        server.start()
        client = server.client
        assert client is not None
        started = time.monotonic()
        fleet.start()

        def online() -> int:
            return int(client.devices(online=True, limit=1)["total"])

        if not wait_until(lambda: online() >= devices, 300, interval=0.5):
            raise RuntimeError(f"only {online()} of {devices} devices came online")
        start_s = time.monotonic() - started
        settle(server, duration_s)
        api = window(server, fleet, ApiProbe(client, devices), duration_s)
        fleet.set_interval(interval_s)
        settle(server, duration_s)
        ingest = window(server, fleet, ApiProbe(client, devices), duration_s)
        rollout = reconcile(server, client, fleet, bundle, devices)

        sent = fleet.stop()
        drained = wait_until(lambda: _drained(server, sent), 120, interval=0.25)
        health = server.health()
        memory = server.memory_mb()
        stop_s = server.stop()
        ingested = ingested_samples(url)
        return {
            "devices": devices,
            "interval_s": round(interval_s, 3),
            "start_s": round(start_s, 1),
            **{k: v for k, v in ingest.items() if not k.startswith("api_")},
            "api_p95_ms": api["api_p95_ms"],
            "api_ms": api["api_ms"],
            "api_errors": api["api_errors"] + ingest["api_errors"],
            "api_first_error": api["api_first_error"] or ingest["api_first_error"],
            "api_ingest_msgs_per_s": api["telemetry_msgs_per_s"],
            "api_p95_ms_at_offered": ingest["api_p95_ms"],
            "api_ms_at_offered": ingest["api_ms"],
            "sent": sent,
            "ingested": ingested,
            "lost": sent - ingested,
            "drained": drained,
            "ingest_dropped": _prefixed(health, "ingest_dropped_"),
            "ingest_invalid": _prefixed(health, "ingest_invalid_"),
            "ingest_db_errors": int(health.get("ingest_db_errors", 0)),
            **rollout,
            "server_rss_mb": memory.get("VmHWM"),
            "server_rss_now_mb": memory.get("VmRSS"),
            "server_stop_s": round(stop_s, 2),
        }
    except Exception:
        log.error("%s run failed; the server's log ends:\n%s", kind, server.tail())
        raise
    finally:
        fleet.kill()
        server.kill()
        broker.stop()


def _prefixed(health: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: int(v) for k, v in health.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ the run


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _ratio(results: dict[str, Any], key: str) -> float | None:
    pg, lite = results.get("postgresql", {}).get(key), results.get("sqlite", {}).get(key)
    return round(pg / lite, 2) if isinstance(pg, int | float) and lite else None


def targets(results: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 15's done-when figures (stated for ``--quick``); None when not measured."""
    measured = [r for r in results.values() if "devices" in r]
    pg = results.get("postgresql", {})
    return {
        "all_reached": all(r["all_reached"] for r in measured) if measured else None,
        "nothing_lost": all(r["lost"] == 0 for r in measured) if measured else None,
        "postgresql_ingest_ge_1000": (
            pg["telemetry_msgs_per_s"] >= 1000 if "telemetry_msgs_per_s" in pg else None
        ),
        "api_p95_le_100ms": (
            all(r["api_p95_ms"] is not None and r["api_p95_ms"] <= 100 for r in measured)
            if measured
            else None
        ),
    }


def run(
    quick: bool,
    devices: int | None,
    duration_s: float | None,
    rate: float = OFFERED_PER_S,
    databases: tuple[str, ...] = DATABASES,
) -> dict[str, Any]:
    requested = devices or (1000 if quick else 10_000)
    # Half the available memory at most, for the simulator's share.
    held = min(requested, int(available_mb() * 0.5 / DEVICE_MB))
    duration = duration_s or (15.0 if quick else 60.0)
    results: dict[str, Any] = {}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-server-"))
    try:
        for kind in databases:
            postgres: FreshPostgres | None = None
            try:
                if kind == "sqlite":
                    url = f"sqlite:///{work / 'fleet.db'}"
                else:
                    postgres = FreshPostgres(os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES))
                    try:
                        url = postgres.create()
                    except Exception as exc:
                        postgres = None
                        reason = f"no PostgreSQL answers: {exc}".splitlines()[0]
                        results[kind] = {"skipped": reason}
                        continue
                results[kind] = measure(kind, url, held, duration, rate, work)
            except Exception as exc:
                results[kind] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            finally:
                if postgres is not None:
                    postgres.drop()
    finally:
        if os.environ.get(KEEP_ENV):
            print(f"fleet_server: work dir kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    errors = sorted(k for k, r in results.items() if "error" in r)
    skipped = sorted(k for k, r in results.items() if "skipped" in r)
    return {
        "benchmark": "fleet_server",
        "quick": quick,
        "complete": not errors and not skipped,
        "errors": errors,
        "skipped": skipped,
        "devices_requested": requested,
        "devices": held,
        "duration_s": duration,
        "offered_per_s": rate,
        "machine": {
            "cores": os.cpu_count(),
            "memory_mb": round(_total_mb()),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "server": "python -m fleet server (one process), one Mosquitto, SimFleet in a child",
        **{kind: results[kind] for kind in databases},
        "ratios": {
            "ingest_postgresql_vs_sqlite": _ratio(results, "telemetry_msgs_per_s"),
            "reconcile_postgresql_vs_sqlite": _ratio(results, "reconcile_s"),
            "api_p95_postgresql_vs_sqlite": _ratio(results, "api_p95_ms"),
        },
        "targets": targets(results),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _total_mb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1024


def failed(report: dict[str, Any]) -> bool:
    measured = [report[k] for k in DATABASES if k in report and "devices" in report[k]]
    return bool(report["errors"]) or any(r["lost"] or not r["all_reached"] for r in measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_server", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 15 s per database")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--devices", type=int, help="simulated devices (default 1,000 / 10,000)")
    parser.add_argument("--duration", type=float, help="seconds of steady telemetry measured")
    parser.add_argument(
        "--rate", type=float, default=OFFERED_PER_S, help="telemetry messages offered per second"
    )
    parser.add_argument(
        "--db", default=",".join(DATABASES), help="comma-separated: sqlite, postgresql"
    )
    args = parser.parse_args(argv)
    databases = tuple(d.strip() for d in args.db.split(",") if d.strip())
    if not databases or set(databases) - set(DATABASES):
        parser.error(f"--db: one or more of {', '.join(DATABASES)}, not {args.db!r}")
    logging.basicConfig(level=logging.ERROR)
    report = run(args.quick, args.devices, args.duration, args.rate, databases)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
