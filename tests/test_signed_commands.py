"""Signed commands end to end: `edge-fleet --command-key` against real agents that
require them (``mqtt.require_signed_commands: true``) over a real Mosquitto.

Two ``agent.service.Agent`` instances (``sig-a``, ``sig-b``, both in group ``lab``)
run in this process with the fleet's command public key as their only
``mqtt.command_keys``. The console signs with ``fleet.signing.CommandSigner``, the same
code ``edge-fleet`` runs; the refusals are sent as raw payloads, as an attacker with
broker access would.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.protocol import PingCommand, Reply, StatusCommand
from agent.service import Agent
from fleet.console import BrokerOptions, Console, ReplyEvent
from fleet.signing import CommandSigner
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "signed"
DEVICES = ("sig-a", "sig-b")


def write_keys(directory: Path) -> tuple[Path, Path]:
    private, public = mf.generate_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(private)
    (directory / "key.pub").write_bytes(public)
    return directory / "key.pem", directory / "key.pub"


def agent_config(
    workdir: Path,
    device: str,
    broker: Broker,
    model_pub: Path,
    cmd_pub: Path,
    max_age_s: float = 120,
) -> Path:
    config = {
        "device": {"id": device, "groups": ["lab"]},
        "state_dir": str(workdir / device),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX,
                 "require_signed_commands": True, "command_keys": [str(cmd_pub)],
                 "command_max_age_s": max_age_s},
        "runtime": {"num_threads": 1},
        "models": {
            "trusted_keys": [str(model_pub)],
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
    def __init__(self, workdir: Path, broker: Broker, bundle: Path, model_pub: Path) -> None:
        self.workdir, self.broker, self.bundle, self.model_pub = workdir, broker, bundle, model_pub
        self.command_key = workdir / "commands" / "key.pem"
        self.other_key = workdir / "other" / "key.pem"
        self.command_pub = workdir / "commands" / "key.pub"
        self.agents: dict[str, Agent] = {}

    def fleet(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "fleet", *args,
             "--broker", f"{self.broker.host}:{self.broker.port}", "--prefix", PREFIX, "--json"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )  # fmt: skip
        try:
            return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"rc {proc.returncode}: {proc.stdout!r} {proc.stderr!r}") from None

    def active(self, device: str) -> str | None:
        (model,) = self.agents[device].lifecycle.model_states()
        return model.active


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_int8_model: Path) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("signed")
    model_key, model_pub = write_keys(workdir / "models")
    _cmd_key, cmd_pub = write_keys(workdir / "commands")
    write_keys(workdir / "other")
    manifest = manifest_for(tiny_int8_model, name="tiny", version="1")
    signature = mf.sign_manifest(manifest, mf.load_private_key(model_key))
    bundle = mf.write_bundle(workdir / "tiny-1", tiny_int8_model, manifest, signature)
    broker = Broker(workdir / "mosquitto")
    broker.start()
    lab = Lab(workdir, broker, bundle, model_pub)
    try:
        for device in DEVICES:
            config = agent_config(workdir, device, broker, model_pub, cmd_pub)
            agent = Agent(LiveConfig.load(config))
            lab.agents[device] = agent
            agent.start()
            assert agent.link.connected, f"{device} did not connect"
        yield lab
    finally:
        for agent in lab.agents.values():
            agent.stop()
        broker.stop()


@pytest.fixture
def console(lab: Lab) -> Iterator[Console]:
    c = Console(BrokerOptions(host=lab.broker.host, port=lab.broker.port, prefix=PREFIX))
    c.connect()
    try:
        yield c
    finally:
        c.close()


def final_replies(
    console: Console, devices: tuple[str, ...], command_id: str, timeout: float = 30.0
) -> dict[str, Reply]:
    """The first done/failed reply of each of ``devices`` to ``command_id``."""
    found: dict[str, Reply] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(devices) and (remaining := deadline - time.monotonic()) > 0:
        try:
            event = console.events.get(timeout=remaining)
        except queue.Empty:
            break
        if (
            isinstance(event, ReplyEvent)
            and event.device in devices
            and event.device not in found
            and event.reply.id == command_id
            and event.reply.status in ("done", "failed")
        ):
            found[event.device] = event.reply
    missing = sorted(set(devices) - set(found))
    assert not missing, f"no final reply from {missing} to {command_id} within {timeout}s"
    return found


def final_reply(console: Console, device: str, command_id: str) -> Reply:
    return final_replies(console, (device,), command_id)[device]


def send_raw(console: Console, device: str, payload: bytes | dict[str, Any]) -> None:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    console.publish(console.topics.cmd(device), payload)


def signer(path: Path, clock_offset: float = 0.0) -> CommandSigner:
    key = mf.load_private_key(path)
    return CommandSigner(key, clock=lambda: time.time() + clock_offset)


def new_id(op: str) -> str:
    return f"{op}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------- accepted


def test_edge_fleet_ping_with_the_command_key_is_answered_by_every_device(lab: Lab) -> None:
    code, out = lab.fleet("ping", "--group", "lab", "--command-key", str(lab.command_key))
    assert code == 0, out
    assert {d["device"]: d["status"] for d in out["devices"]} == dict.fromkeys(DEVICES, "done")


def test_a_signed_status_command_is_answered(lab: Lab, console: Console) -> None:
    command = StatusCommand(id=new_id("sta"))
    send_raw(console, "sig-a", signer(lab.command_key).payload("device/sig-a", command))
    reply = final_reply(console, "sig-a", command.id)
    assert reply.status == "done", reply
    assert reply.data is not None and "models" in reply.data


def test_a_command_signed_for_the_group_is_obeyed_by_its_members(
    lab: Lab, console: Console
) -> None:
    command = PingCommand(id=new_id("pin"))
    payload = signer(lab.command_key).payload("group/lab", command)
    console.publish(console.topics.group_cmd("lab"), payload)
    replies = final_replies(console, DEVICES, command.id)
    assert {d: r.status for d, r in replies.items()} == dict.fromkeys(DEVICES, "done"), replies


def test_edge_fleet_deploy_with_the_command_key_installs_the_model(lab: Lab) -> None:
    code, out = lab.fleet(
        "deploy", str(lab.bundle), "--device", "sig-b", "--pub", str(lab.model_pub),
        "--via", "mqtt", "--timeout", "90", "--command-key", str(lab.command_key),
    )  # fmt: skip
    assert code == 0, out
    (device,) = out["devices"]
    assert device["status"] == "done", device
    assert lab.active("sig-b") == "1"


# ---------------------------------------------------------------------- refused


def test_edge_fleet_without_a_command_key_is_refused(lab: Lab) -> None:
    code, out = lab.fleet("ping", "--device", "sig-a", "--timeout", "20")
    assert code == 4, out  # at least one device failed
    (device,) = out["devices"]
    assert device["status"] == "failed" and device["code"] == "bad_signature", device
    assert "unsigned" in device["message"]


def test_an_unsigned_deploy_is_refused_and_nothing_is_installed(lab: Lab) -> None:
    code, out = lab.fleet(
        "deploy", str(lab.bundle), "--device", "sig-a", "--pub", str(lab.model_pub),
        "--via", "mqtt", "--timeout", "30",
    )  # fmt: skip
    assert code == 4, out
    (device,) = out["devices"]
    assert device["code"] == "bad_signature", device
    assert lab.active("sig-a") is None


def test_a_replayed_signed_command_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"))
    payload = signer(lab.command_key).payload("device/sig-a", command)
    send_raw(console, "sig-a", payload)
    assert final_reply(console, "sig-a", command.id).status == "done"
    send_raw(console, "sig-a", payload)
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature"), reply
    assert "replay" in reply.message


def test_a_command_signed_too_long_ago_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"))
    payload = signer(lab.command_key, clock_offset=-600).payload("device/sig-a", command)
    send_raw(console, "sig-a", payload)
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature"), reply
    assert "signed" in reply.message and "allowed" in reply.message


def test_a_signed_command_past_its_expiry_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"), expires_at=time.time() - 60)
    send_raw(console, "sig-a", signer(lab.command_key).payload("device/sig-a", command))
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "expired"), reply


def test_a_command_signed_for_another_device_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"))
    payload = signer(lab.command_key).payload("device/sig-b", command)
    send_raw(console, "sig-a", payload)
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature"), reply
    assert "device/sig-b" in reply.message
    # The same bytes are good where they were meant to go.
    send_raw(console, "sig-b", payload)
    assert final_reply(console, "sig-b", command.id).status == "done"


def test_a_command_signed_by_an_unknown_key_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"))
    send_raw(console, "sig-a", signer(lab.other_key).payload("device/sig-a", command))
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature"), reply
    assert "does not verify" in reply.message


def test_a_signed_command_changed_after_signing_is_refused(lab: Lab, console: Console) -> None:
    command = PingCommand(id=new_id("pin"))
    data = json.loads(signer(lab.command_key).payload("device/sig-a", command))
    data["expires_at"] = time.time() + 10_000  # an attacker stretching the command's life
    send_raw(console, "sig-a", data)
    reply = final_reply(console, "sig-a", command.id)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature"), reply


def test_a_bad_command_key_file_stops_edge_fleet_before_anything_is_sent(lab: Lab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "ping", "--broker",
         f"{lab.broker.host}:{lab.broker.port}", "--command-key", str(lab.model_pub)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert "--command-key" in proc.stderr


def test_a_command_sent_again_is_signed_afresh_and_answered_as_a_duplicate(
    lab: Lab, console: Console
) -> None:
    # What edge-fleet does for a device that comes back online: the same command id,
    # a new signature. The device must not run it twice, nor call it a replay.
    command = PingCommand(id=new_id("pin"))
    fleet_signer = signer(lab.command_key)
    first = fleet_signer.payload("device/sig-a", command)
    again = fleet_signer.payload("device/sig-a", command)
    assert json.loads(first)["auth"]["nonce"] != json.loads(again)["auth"]["nonce"]
    send_raw(console, "sig-a", first)
    assert final_reply(console, "sig-a", command.id).status == "done"
    send_raw(console, "sig-a", again)
    reply = final_reply(console, "sig-a", command.id)
    assert reply.code.value == "duplicate", reply
    assert reply.data is not None and reply.data["original"]["status"] == "done"


def test_a_device_offline_longer_than_the_signature_window_still_gets_the_command(
    lab: Lab, console: Console
) -> None:
    # The broker keeps the command for the offline device, but the device refuses that
    # copy as stale; edge-fleet sends it again, signed anew, and the device runs it.
    max_age_s = 2.0
    config = agent_config(
        lab.workdir, "sig-c", lab.broker, lab.model_pub, lab.command_pub, max_age_s
    )
    first = Agent(LiveConfig.load(config))
    first.start()
    assert first.link.connected
    first.stop()  # offline; its persistent session keeps collecting commands
    seen = MessageCollector(lab.broker, [f"{PREFIX}/sig-c/cmd", f"{PREFIX}/sig-c/reply"])
    fleet = subprocess.Popen(
        [sys.executable, "-m", "fleet", "ping", "--device", "sig-c", "--timeout", "90",
         "--command-key", str(lab.command_key), "--broker",
         f"{lab.broker.host}:{lab.broker.port}", "--prefix", PREFIX, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
    )  # fmt: skip
    again: Agent | None = None
    try:
        (queued,) = seen.wait_for(1, timeout=60, topic=f"{PREFIX}/sig-c/cmd")
        signed_at = json.loads(queued.payload)["auth"]["ts"]
        # Until the queued copy is older than the device accepts (a clock condition).
        while time.time() < signed_at + max_age_s + 0.5:
            time.sleep(0.1)
        again = Agent(LiveConfig.load(config))
        again.start()
        out, err = fleet.communicate(timeout=120)
    finally:
        if fleet.poll() is None:
            fleet.kill()
        if again is not None:
            again.stop()
        seen.close()
    assert fleet.returncode == 0, (out, err)
    (device,) = json.loads(out.strip().splitlines()[-1])["devices"]
    assert device["status"] == "done", device
    replies = [
        Reply.model_validate_json(m.payload)
        for m in seen.messages
        if m.topic == f"{PREFIX}/sig-c/reply"
    ]
    refused = [r for r in replies if r.status == "failed"]
    assert refused and refused[0].code.value == "bad_signature", replies
    assert "allowed: 2s" in refused[0].message
    assert [r.status for r in replies if r.status == "done"] == ["done"]
