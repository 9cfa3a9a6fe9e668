"""``edge-fleet server`` as a process, end to end: start with no setup, a rollout that
survives a kill of the server mid-wave, and simulated devices over a real broker.

(Real agents against the server: tests/server/test_server_agents.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.client import ServerClient
from fleet.sim import SimFleet
from tests.fleet_support import Keys, make_bundle, make_keys
from tests.mqtt_support import Broker, free_port
from tests.server.server_support import ROOT, ServerProcess, wait_until

PREFIX = "e2e"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def bundle(tmp_path: Path, keys: Keys, version: str) -> Path:
    return make_bundle(tmp_path / f"digits-{version}", os.urandom(3000), version=version, keys=keys)


def client(server: ServerProcess) -> ServerClient:
    return ServerClient(server.url, server.token)


def test_starts_with_no_setup_and_stops_on_sigterm(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "server", "--bind", f"127.0.0.1:{port}",
         "--broker", f"{broker.host}:{broker.port}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        token_file = tmp_path / "fleet-data" / "admin.token"
        wait_until(token_file.exists, 30, "the admin token")
        api = ServerClient(f"http://127.0.0.1:{port}", token_file.read_text().strip())
        wait_until(lambda: _answers(api), 30, "the API")
        assert api.devices()["total"] == 0
        assert (tmp_path / "fleet-data" / "fleet.db").is_file()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "made the operator token 'admin'" in out and "stopped" in out


def _answers(api: ServerClient) -> bool:
    try:
        api.devices()
    except Exception:
        return False
    return True


@pytest.fixture
def fleet(broker: Broker) -> Iterator[SimFleet]:
    sim = SimFleet(
        broker.host, broker.port, devices=[f"cam-{i}" for i in range(4)], prefix=PREFIX,
        groups=["door"], interval_s=0.5, step_delay_s=0.4, fetch_artifacts=True,
    )  # fmt: skip
    sim.start()
    yield sim
    sim.stop()


def server_for(tmp_path: Path, broker: Broker, keys: Keys, **kw: Any) -> ServerProcess:
    return ServerProcess(
        tmp_path / "server", broker, prefix=PREFIX, trusted_keys=[keys.public], **kw
    )


def test_a_rollout_survives_a_killed_server_mid_wave(
    tmp_path: Path, broker: Broker, keys: Keys, fleet: SimFleet
) -> None:
    server = server_for(tmp_path, broker, keys)
    server.start()
    try:
        api = client(server)
        wait_until(lambda: api.devices(online=True)["total"] == 4, 30, "4 devices online")
        api.upload_bundle(bundle(tmp_path, keys, "2"))
        rollout = api.create_rollout(
            {"model": "digits", "version": "2", "group": "door", "canary": "1", "waves": 1}
        )
        rid = rollout["id"]
        # The canary got its deploy and is working through its stages (each 0.4 s).
        canary = wait_until(
            lambda: [d for d in fleet.devices if fleet.runs(d)], 30, "the canary's deploy"
        )
        server.kill()  # SIGKILL: no lease released, nothing flushed
        server.start()
        api = client(server)
        wait_until(lambda: _state(api, rid) == "done", 60, "the rollout to finish")
    finally:
        server.kill()
    assert canary and all(fleet.active(d) == "2" for d in fleet.devices)
    # No command ran twice and every device installed the version once. (The canary's
    # download may have failed while the server was down: a try retried under a new id.)
    assert all(set(fleet.runs(d).values()) == {1} for d in fleet.devices)
    assert {d: fleet.installed(d) for d in fleet.devices} == {
        d: ["digits 2"] for d in fleet.devices
    }


def _state(api: ServerClient, rid: str) -> str:
    try:
        view = api.rollout(rid)
    except Exception:
        return "unreachable"
    rows = [(d["device"], d["status"], d.get("code"), d.get("message")) for d in view["devices"]]
    print(view["state"], rows)
    return str(view["state"])


def test_a_device_offline_through_the_rollout_and_one_that_joins_later(
    tmp_path: Path, broker: Broker, keys: Keys, fleet: SimFleet
) -> None:
    fleet.stop_device("cam-3")
    server = server_for(tmp_path, broker, keys)
    server.start()
    try:
        api = client(server)
        wait_until(lambda: api.devices(online=True)["total"] == 3, 30, "3 devices online")
        b = bundle(tmp_path, keys, "2")
        # The operator's CLI: uploads, creates the rollout, follows it and exits (5: a
        # device did not finish, it is offline).
        proc = subprocess.run(
            [sys.executable, "-m", "fleet", "deploy", str(b), "--server", server.url,
             "--group", "door", "--pub", str(keys.public), "--timeout", "30"],
            env={**os.environ, "PYTHONPATH": str(ROOT), "EDGE_FLEET_TOKEN": server.token or ""},
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert "cam-3" in proc.stdout and "pending" in proc.stdout
        assert fleet.active("cam-3") == "1"
        # Back online after the CLI exited: brought to the version by the server.
        fleet.start_device("cam-3")
        wait_until(lambda: fleet.active("cam-3") == "2", 30, "cam-3 on version 2")
        # A device joins the group next week.
        fleet.set_groups("cam-2", [])
        fleet.roll_back_locally("cam-2", "1")
        wait_until(lambda: _active(api, "cam-2") == "1", 30, "the server to see cam-2 on 1")
        time.sleep(1.0)
        assert fleet.active("cam-2") == "1", "a device outside the group was changed"
        fleet.set_groups("cam-2", ["door"])
        wait_until(lambda: fleet.active("cam-2") == "2", 30, "the joiner on version 2")
    finally:
        server.kill()


def _active(api: ServerClient, device: str) -> str | None:
    models = api.device(device).get("models") or []
    for m in models:
        if m.get("name") == "digits":
            return m.get("active")
    return None
