"""The README's screenshots of the dashboard, made from a real server and fleet.

    PYTHONPATH=. .venv/bin/python -m tests.server.screenshots [--out docs/images]

Starts a Mosquitto, an ``edge-fleet server`` and simulated devices (an entrance group
whose deploys take a few seconds a stage, a warehouse group, two of its devices
offline), rolls the warehouse out to digits 2 (one device failing probation), then
starts a canary rollout on the entrance and, once its first wave is on probation,
saves at 1280x800:

- ``dashboard-overview.png``: the overview (``/``);
- ``dashboard-rollout.png``: the rollout's page (``/rollouts/<id>``).

Uses Debian's Chromium like the browser tests (``EDGE_TEST_CHROMIUM`` names another).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.protocol import ReplyCode
from fleet.sim import SimFleet
from tests.mqtt_support import Broker
from tests.server.browser_support import VIEWPORT, Dashboard, chromium, login

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "shots"


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dashboard-shots-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "mosquitto")
        broker.start()
        board = Dashboard(work / "dashboard", broker, PREFIX)
        entrance = SimFleet(
            broker.host, broker.port, devices=[f"entrance-{i:02d}" for i in range(8)],
            prefix=PREFIX, groups=["entrance"], interval_s=1.0, step_delay_s=2.0,
        )  # fmt: skip
        warehouse = SimFleet(
            broker.host, broker.port, devices=[f"warehouse-{i:02d}" for i in range(16)],
            prefix=PREFIX, groups=["warehouse"], interval_s=1.0, step_delay_s=0.05,
        )  # fmt: skip
        try:
            board.start()
            entrance.start()
            warehouse.start()
            api = board.api()
            wait(lambda: api.devices(online=True)["total"] == 24, 30, "24 devices online")
            board.upload_bundle("2")
            warehouse.fail_deploys("warehouse-07", ReplyCode.PROBATION_FAILED,
                                   "p95 latency 3x the previous version")  # fmt: skip
            done = api.create_rollout(
                {"model": "digits", "version": "2", "group": "warehouse", "max_failures": 1}
            )
            wait(lambda: api.rollout(done["id"])["state"] == "done", 60, "the warehouse on 2")
            for device in ("warehouse-03", "warehouse-11"):
                warehouse.stop_device(device)
            rollout = api.create_rollout(
                {"model": "digits", "version": "2", "group": "entrance", "canary": "1",
                 "waves": 2}
            )  # fmt: skip

            def in_progress() -> bool:
                statuses = [d["status"] for d in api.rollout(rollout["id"])["devices"]]
                return "probation" in statuses and statuses.count("done") > 1

            # A wave after the canary on probation, the ones before it done.
            wait(in_progress, 90, "the entrance rollout in progress")
            with chromium() as browser:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                login(page, board.url, board.token)
                page.goto(board.url + "/")
                page.wait_for_selector("body[data-live=on]")
                overview, detail = out / "dashboard-overview.png", out / "dashboard-rollout.png"
                page.screenshot(path=overview)
                page.goto(f"{board.url}/rollouts/{rollout['id']}")
                page.wait_for_selector("body[data-live=on]")
                page.screenshot(path=detail)
            return [overview, detail]
        finally:
            entrance.stop()
            warehouse.stop()
            board.stop()
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.server.screenshots", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    for path in make(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
