"""The dashboard at fleet scale, in a real Chromium: page loads, live updates, weight.

    python -m benchmarks.dashboard [--quick] --json [--devices N] [--changes N]

A real ``edge-fleet server`` (SQLite, its own process) on a private Mosquitto, with
N simulated devices (``fleet.sim.SimFleet`` in a child process, as another machine
would be: 1,000 with ``--quick``, else 10,000) all online and sending telemetry at
about ``TELEMETRY_PER_S`` messages a second in all. Debian's Chromium (Playwright,
tests/server/browser_support.py; ``EDGE_TEST_CHROMIUM`` names another) logs in with
the admin token, then:

- ``overview_load_ms``: navigation to ``/`` until its counts are filled in;
- ``devices_page_load_ms``: navigation to ``/devices`` until its 50 rows are there;
- ``device_page_load_ms``: navigation to ``/devices/<id>`` until its three charts
  (fps, latency, errors) are drawn (a uPlot canvas in each);
  each the median of ``LOADS`` navigations (the first, with a cold cache, is in
  ``*_first_ms``);
- ``live_update_ms_p95`` (and ``_p50``, ``_max``): a device's state changed on the
  broker (the simulator stops or starts it: an offline or online retained state) to
  its row in ``/devices`` showing it, the page left open (server-sent events), over
  ``--changes`` changes (20; each to a device on the list's first page);
- ``page_weight_kb``: every response of one load of the overview in a fresh context
  (empty cache), headers and bodies as transferred (Playwright's ``request.sizes()``),
  the event stream left out (it never ends); ``page_requests`` counts them.

The issue's bounds (``--quick``): every ``*_load_ms`` <= 1000, ``live_update_ms_p95``
<= 2000, ``page_weight_kb`` <= 500; ``within_bounds`` says whether they hold. A step
that breaks is named in ``errors`` and ``complete`` is false. The server, broker,
simulator and browser are stopped and the temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Response

from benchmarks._server_harness import SimChild, device_ids
from tests.mqtt_support import Broker
from tests.server.browser_support import VIEWPORT, Dashboard, chromium, login

PREFIX = "bench-dash"
TELEMETRY_PER_S = 1000.0
PER_CONNECTION = 500
LOADS = 5
PAGE_ROWS = 50
BOUNDS = {"load_ms": 1000.0, "live_update_ms_p95": 2000.0, "page_weight_kb": 500.0}
TIMEOUT_MS = 30_000
CHARTS = ("chart-fps", "chart-latency", "chart-errors")
FIGURES = (
    "overview_load_ms",
    "devices_page_load_ms",
    "device_page_load_ms",
    "live_update_ms_p95",
    "page_weight_kb",
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- measurements


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def page_loads(page: Page, load: Callable[[], None], times: int = LOADS) -> dict[str, float]:
    samples = [timed(load) for _ in range(times)]
    log.info("loads (ms): %s", [round(x) for x in samples])
    return {"ms": round(statistics.median(samples), 1), "first_ms": round(samples[0], 1)}


def load_overview(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function(
        "() => ['online', 'offline'].every(n => {"
        "  const el = document.querySelector(`[data-testid=count-${n}]`);"
        "  return el && /\\d/.test(el.textContent); })",
        timeout=TIMEOUT_MS,
    )


def load_devices(page: Page, url: str, rows: int) -> None:
    page.goto(url + "/devices")
    page.wait_for_function(
        "(n) => document.querySelectorAll('table[data-testid=devices] tr[data-device]')"
        ".length >= n",
        arg=rows,
        timeout=TIMEOUT_MS,
    )


def load_device(page: Page, url: str, device: str) -> None:
    page.goto(f"{url}/devices/{device}")
    page.wait_for_function(
        "(charts) => charts.every(c => {"
        "  const canvas = document.querySelector(`[data-testid=${c}] canvas`);"
        "  return canvas && canvas.width > 0; })",
        arg=list(CHARTS),
        timeout=TIMEOUT_MS,
    )


def live_updates(
    page: Page, url: str, fleet: SimChild, devices: list[str], changes: int
) -> list[float]:
    """ms from each change published to its row in /devices showing it."""
    page.goto(url + "/devices")
    page.wait_for_selector("body[data-live=on]", timeout=TIMEOUT_MS)
    samples: list[float] = []
    for i in range(changes):
        device = devices[(i // 2) % len(devices)]
        op, shown = ("stop", "offline") if i % 2 == 0 else ("start", "ok")
        start = time.perf_counter()
        fleet.change(op, device)
        page.wait_for_function(
            "([d, s]) => { const td = document.querySelector("
            '  `tr[data-device="${d}"] td.status`); return td && td.textContent.trim() === s; }',
            arg=[device, shown],
            polling="raf",
            timeout=TIMEOUT_MS,
        )
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def page_weight(browser: Browser, logged_in: BrowserContext, url: str) -> dict[str, Any]:
    """Bytes of one overview load with an empty cache, the event stream left out."""
    context = browser.new_context(viewport=VIEWPORT, storage_state=logged_in.storage_state())
    try:
        page = context.new_page()
        responses: list[Response] = []
        page.on("response", lambda response: responses.append(response))
        load_overview(page, url)
        total = 0
        counted = 0
        for response in responses:
            if "text/event-stream" in (response.headers.get("content-type") or ""):
                continue
            sizes = response.request.sizes()
            total += sizes["responseHeadersSize"] + sizes["responseBodySize"]
            counted += 1
        return {"page_weight_kb": round(total / 1024, 1), "page_requests": counted}
    finally:
        context.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- a run


def wait_online(board: Dashboard, devices: int, timeout: float) -> float:
    api = board.api()
    start = time.monotonic()
    while api.devices(online=True, limit=1)["total"] < devices:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"not all {devices} devices came online within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


def measure(report: dict[str, Any], work: Path, devices: int, changes: int) -> None:
    errors: list[str] = report["errors"]

    def step(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            log.exception("%s failed", name)
            errors.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])

    broker = Broker(work / "mosquitto")
    broker.start()
    board = Dashboard(work / "dashboard", broker, PREFIX)
    fleet = SimChild(
        broker,
        devices,
        interval_s=devices / TELEMETRY_PER_S,
        prefix=PREFIX,
        per_connection=PER_CONNECTION,
    )
    try:
        board.start()
        fleet.start()
        report["online_s"] = round(wait_online(board, devices, 300), 1)
        with chromium() as browser:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            login(page, board.url, board.token)
            url = board.url
            first = device_ids(devices)[0]

            def overview() -> None:
                loads = page_loads(page, lambda: load_overview(page, url))
                report["overview_load_ms"], report["overview_first_ms"] = (
                    loads["ms"],
                    loads["first_ms"],
                )

            def devices_page() -> None:
                rows = min(PAGE_ROWS, devices)
                loads = page_loads(page, lambda: load_devices(page, url, rows))
                report["devices_page_load_ms"] = loads["ms"]
                report["devices_page_first_ms"] = loads["first_ms"]

            def device_page() -> None:
                loads = page_loads(page, lambda: load_device(page, url, first))
                report["device_page_load_ms"] = loads["ms"]
                report["device_page_first_ms"] = loads["first_ms"]

            def live() -> None:
                targets = device_ids(devices)[1 : 1 + min(10, PAGE_ROWS - 1)]
                samples = live_updates(page, url, fleet, targets, changes)
                report["live_update_ms_p95"] = round(percentile(samples, 0.95), 1)
                report["live_update_ms_p50"] = round(statistics.median(samples), 1)
                report["live_update_ms_max"] = round(max(samples), 1)
                report["live_updates"] = len(samples)

            step("overview", overview)
            step("devices_page", devices_page)
            step("device_page", device_page)
            step("live_update", live)
            step("page_weight", lambda: report.update(page_weight(browser, context, url)))
            context.close()
    except Exception as exc:
        log.exception("the benchmark broke")
        errors.append(f"setup: {type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        try:
            fleet.stop()
        except Exception:
            log.exception("the simulated fleet did not stop")
        fleet.kill()
        board.stop()
        broker.stop()


def within_bounds(report: dict[str, Any]) -> bool | None:
    figures = [report.get(k) for k in FIGURES]
    if any(f is None for f in figures):
        return None
    loads = [report[k] for k in FIGURES if k.endswith("_load_ms")]
    return (
        max(loads) <= BOUNDS["load_ms"]
        and report["live_update_ms_p95"] <= BOUNDS["live_update_ms_p95"]
        and report["page_weight_kb"] <= BOUNDS["page_weight_kb"]
    )


def run(quick: bool, devices: int | None, changes: int) -> dict[str, Any]:
    count = devices or (1000 if quick else 10_000)
    report: dict[str, Any] = {
        "benchmark": "dashboard",
        "quick": quick,
        "devices": count,
        "changes": changes,
        "loads": LOADS,
        "server": "edge-fleet server (SQLite) + Mosquitto, SimFleet in a child process",
        "browser": "Chromium via Playwright",
        **dict.fromkeys(FIGURES),
        "errors": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        measure(report, Path(tmp), count, changes)
    report["within_bounds"] = within_bounds(report)
    report["complete"] = not report["errors"] and all(report[k] is not None for k in FIGURES)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 devices (else 10,000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--devices", type=int, help="simulated devices (default 1,000 / 10,000)")
    parser.add_argument("--changes", type=int, default=20, help="live state changes timed")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each sample")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    report = run(args.quick, args.devices, args.changes)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
