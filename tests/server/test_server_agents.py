"""The fleet server with real agents: a real int8 model, downloaded from the server's
artifact store over HTTP, validated in a child process, swapped in and put on
probation, for a device that was offline during the rollout and one that joined later.

Agents run in this process (``agent.service.Agent``, as in tests/test_fleet_real_agents.py);
the server is its own process (``edge-fleet server``), and the operator's deploy is the
CLI, which exits before the offline device comes back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.service import Agent
from fleet.client import ServerClient
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker
from tests.server.server_support import ROOT, ServerProcess, wait_until

PREFIX = "srv-agents"


def agent_config(workdir: Path, device: str, broker: Broker, trusted: Path) -> Path:
    config = {
        "device": {"id": device, "groups": ["lab"]},
        "state_dir": str(workdir / device),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
        "runtime": {"num_threads": 1},
        "models": {"trusted_keys": [str(trusted)],
                   "probation": {"duration_s": 1.0, "min_inferences": 3}},
        "telemetry": {"interval_s": 1},
        "pipelines": [{
            "name": "cam", "model": "tiny",
            "source": {"type": "synthetic", "kind": "frames", "width": 8, "height": 8,
                       "channels": 1, "fps": 20},
        }],
    }  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Agents:
    def __init__(self, workdir: Path, broker: Broker, trusted: Path) -> None:
        self.workdir, self.broker, self.trusted = workdir, broker, trusted
        self.running: dict[str, Agent] = {}

    def start(self, device: str) -> None:
        agent = Agent(
            LiveConfig.load(agent_config(self.workdir, device, self.broker, self.trusted))
        )
        agent.start()
        self.running[device] = agent

    def stop(self, device: str) -> None:
        self.running.pop(device).stop()

    def active(self, device: str) -> str | None:
        (model,) = self.running[device].lifecycle.model_states()
        return model.active

    def stop_all(self) -> None:
        for device in list(self.running):
            self.stop(device)


@pytest.fixture
def agents(tmp_path: Path, broker: Broker) -> Iterator[Agents]:
    lab = Agents(tmp_path / "agents", broker, tmp_path / "keys" / "signing.pub")
    yield lab
    lab.stop_all()


def test_offline_and_late_devices_get_the_version_after_the_cli_exited(
    tmp_path: Path, broker: Broker, agents: Agents, tiny_int8_model: Path
) -> None:
    private, public = mf.generate_keypair()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pem").write_bytes(private)
    (tmp_path / "keys" / "signing.pub").write_bytes(public)
    manifest = manifest_for(tiny_int8_model, name="tiny", version="1")
    signature = mf.sign_manifest(manifest, mf.load_private_key(tmp_path / "keys" / "signing.pem"))
    bundle = mf.write_bundle(tmp_path / "tiny-1", tiny_int8_model, manifest, signature)

    server = ServerProcess(
        tmp_path / "server", broker, prefix=PREFIX, trusted_keys=[tmp_path / "keys/signing.pub"]
    )
    server.start()
    try:
        api = ServerClient(server.url, server.token)
        for device in ("pi-a", "pi-b"):
            agents.start(device)
        wait_until(lambda: api.devices(online=True)["total"] == 2, 30, "two agents online")
        agents.stop("pi-b")  # away for the whole rollout
        wait_until(lambda: api.devices(online=True)["total"] == 1, 30, "pi-b offline")

        proc = subprocess.run(
            [sys.executable, "-m", "fleet", "deploy", str(bundle), "--server", server.url,
             "--group", "lab", "--pub", str(tmp_path / "keys/signing.pub"), "--timeout", "60"],
            env={**os.environ, "PYTHONPATH": str(ROOT), "EDGE_FLEET_TOKEN": server.token or ""},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # pi-a done; pi-b offline and pending: not finished (5), and the CLI has exited.
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert agents.active("pi-a") == "1"

        agents.start("pi-b")  # back: the server brings it to the version
        wait_until(lambda: agents.active("pi-b") == "1", 60, "pi-b on version 1")
        agents.start("pi-c")  # a new device of the group
        wait_until(lambda: agents.active("pi-c") == "1", 60, "pi-c on version 1")

        [rollout] = api.rollouts()["rollouts"]

        def statuses() -> dict[str, str]:
            return {d["device"]: d["status"] for d in api.rollout(rollout["id"])["devices"]}

        # Active from the swap, done once probation passed and the reply came.
        wait_until(lambda: set(statuses().values()) == {"done"}, 60, "every device done")
        assert set(statuses()) == {"pi-a", "pi-b", "pi-c"}
        history = api.history("pi-b")
        assert any(v.get("version") == "1" for v in history["versions"]), history
    finally:
        server.kill()
