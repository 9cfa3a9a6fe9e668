"""The fleet server's Grafana dashboard (docs/grafana/fleet.json) queries only metrics a
running `edge-fleet server` exports over HTTP."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.grafana_support import check, exported
from tests.mqtt_support import Broker
from tests.server.server_support import ServerProcess


@pytest.fixture
def fleet_server(broker: Broker, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "fleet", broker, prefix="grafana-test")
    server.start()
    try:
        yield server
    finally:
        server.terminate()


def test_fleet_dashboard_names_only_exported_metrics(fleet_server: ServerProcess) -> None:
    # The reconciler's lag is reported once it has ticked (every 0.2 s here).
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(fleet_server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        if "edge_fleet_reconcile_lag_s" in text:
            break
        assert time.monotonic() < deadline, f"no reconcile lag in {text[-2000:]}"
        time.sleep(0.2)
    used = check("fleet.json", exported(text))
    assert {"edge_fleet_devices", "edge_fleet_rollouts", "edge_fleet_ingest_lag_s"} <= used
