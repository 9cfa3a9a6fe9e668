"""Canary rollouts with `edge-fleet deploy` against real agents.

Three ``agent.service.Agent`` instances (link, command plane, chunk transfer, model
store, validation child, hot-swap, probation) run in this process against a private
Mosquitto. ``cam-a`` trusts a different signing key than the fleet uses, so it
really refuses the bundle (``bad_signature``) after fetching it over MQTT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.service import Agent
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("cam-a", "cam-b", "cam-c")  # cam-a sorts first: it is the canary


def write_keys(directory: Path) -> tuple[Path, Path]:
    private, public = mf.generate_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(private)
    (directory / "key.pub").write_bytes(public)
    return directory / "key.pem", directory / "key.pub"


def agent_config(workdir: Path, device: str, broker: Broker, trusted: Path) -> Path:
    config = {
        "device": {"id": device, "groups": ["lab"]},
        "state_dir": str(workdir / device),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "canary"},
        "runtime": {"num_threads": 1},
        "models": {
            "trusted_keys": [str(trusted)],
            "probation": {"duration_s": 1.0, "min_inferences": 3},
        },
        "pipelines": [{
            "name": "cam", "model": "tiny",
            "source": {"type": "synthetic", "kind": "frames", "width": 8, "height": 8,
                       "channels": 1, "fps": 20},
        }],
        "transfer": {"chunk_wait_s": 2.0},
    }  # fmt: skip
    path = workdir / f"{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Lab:
    def __init__(self, workdir: Path, broker: Broker, bundle: Path, pub: Path) -> None:
        self.workdir, self.broker, self.bundle, self.pub = workdir, broker, bundle, pub
        self.agents: dict[str, Agent] = {}

    def active(self, device: str) -> str | None:
        (model,) = self.agents[device].lifecycle.model_states()
        return model.active

    def deploy(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "fleet", "deploy", str(self.bundle),
             "--broker", f"{self.broker.host}:{self.broker.port}", "--prefix", "canary",
             "--pub", str(self.pub), "--via", "mqtt", "--timeout", "60", "--json", *args],
            capture_output=True, text=True, timeout=90, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )  # fmt: skip
        try:
            return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"rc {proc.returncode}: {proc.stdout!r} {proc.stderr!r}") from None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_int8_model: Path) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("canary")
    fleet_key, fleet_pub = write_keys(workdir / "fleet")
    _other_key, other_pub = write_keys(workdir / "other")
    manifest = manifest_for(tiny_int8_model, name="tiny", version="1")
    signature = mf.sign_manifest(manifest, mf.load_private_key(fleet_key))
    bundle = mf.write_bundle(workdir / "tiny-1", tiny_int8_model, manifest, signature)
    broker = Broker(workdir / "mosquitto")
    broker.start()
    lab = Lab(workdir, broker, bundle, fleet_pub)
    try:
        for device in DEVICES:
            trusted = other_pub if device == "cam-a" else fleet_pub
            agent = Agent(LiveConfig.load(agent_config(workdir, device, broker, trusted)))
            lab.agents[device] = agent
            agent.start()
            assert agent.link.connected, f"{device} did not connect"
        yield lab
    finally:
        for agent in lab.agents.values():
            agent.stop()
        broker.stop()


def test_canary_refusal_halts_the_rollout_and_names_device_and_reason(lab: Lab) -> None:
    code, out = lab.deploy("--group", "lab", "--canary", "1")
    assert code == 3, out  # EXIT_HALTED
    assert out["result"] == "halted" and out["exit_code"] == 3
    by_device = {d["device"]: d for d in out["devices"]}
    canary = by_device["cam-a"]
    assert canary["status"] == "failed" and canary["code"] == "bad_signature", canary
    assert "does not verify with any trusted key" in canary["message"]
    assert {by_device[d]["status"] for d in ("cam-b", "cam-c")} == {"skipped"}
    assert [lab.active(d) for d in DEVICES] == [None, None, None]


def test_healthy_canary_then_the_rest_over_mqtt(lab: Lab) -> None:
    code, out = lab.deploy("--device", "cam-b", "cam-c", "--canary", "1")
    assert code == 0, out
    waves = {d["device"]: (d["wave"], d["status"]) for d in out["devices"]}
    assert waves == {"cam-b": (0, "done"), "cam-c": (1, "done")}
    assert [lab.active(d) for d in DEVICES] == [None, "1", "1"]
