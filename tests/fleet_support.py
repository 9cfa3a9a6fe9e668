"""Test support for the fleet console: a simulated device, bundles, and running the CLI.

``SimDevice`` is a test double of the protocol peer, written from docs/protocol.md:
a retained state with a last will, a persistent session, and to every command the
replies accepted -> progress -> done/failed. Every message it receives is parsed
with the ``agent.protocol`` models; anything that does not parse is recorded in
``invalid`` (and answered ``failed``), so a test that checks ``invalid == []``
keeps the console honest. A deploy really downloads the URL artifact or receives
the MQTT chunks as the real agent does (subscribes when the transfer starts, asks
for the missing chunks with ``ChunkRequest`` and again after a silence, drops a
chunk without a matching sha256), and checks the manifest's sha256 and size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.models.manifest import (
    BundleError,
    generate_keypair,
    load_private_key,
    parse_manifest,
    sign_manifest,
    verify_signature,
    write_bundle,
)
from agent.protocol import (
    MAX_MISSING_LISTED,
    Chunk,
    ChunkRequest,
    ClassScore,
    Command,
    CommandFailed,
    DeployCommand,
    ModelState,
    MqttArtifact,
    PingCommand,
    PipelineState,
    PipelineTelemetry,
    ProtocolError,
    Reply,
    ReplyCode,
    Result,
    RollbackCommand,
    RuntimeInfo,
    State,
    StatusCommand,
    Telemetry,
    Topics,
    command_id_of,
    decode_command,
)
from tests.mqtt_support import Broker

REPO = Path(__file__).resolve().parent.parent
# Unanswered chunk requests in a row before a simulated transfer fails.
CHUNK_REQUESTS = 4


class SimDevice:
    """A simulated edge-agent speaking the wire protocol over a real broker."""

    def __init__(
        self,
        broker: Broker,
        device: str,
        *,
        prefix: str,
        groups: Iterable[str] = (),
        models: dict[str, str] | None = None,
        model_states: Iterable[ModelState] = (),
        reject: dict[str, tuple[ReplyCode, str]] | None = None,
        trusted_keys: Iterable[Ed25519PublicKey] = (),
        telemetry_interval: float = 0.3,
        pipeline: str = "cam",
        results: bool = False,
        chunk_wait_s: float = 1.0,
        lose_chunks: int = 0,
        drift: float | None = None,
        drift_warning: str | None = None,
    ) -> None:
        self.broker = broker
        self.drift = drift  # the pipeline's PSI in telemetry
        self.drift_warning = drift_warning  # and its warning in state
        self.device = device
        self.topics = Topics(prefix)
        self.groups = list(groups)
        self.reject = reject or {}  # version -> (code, message) of the failed reply
        self.trusted_keys = list(trusted_keys)
        self.telemetry_interval = telemetry_interval
        self.pipeline = pipeline
        self.publish_results = results
        self.models = {
            name: ModelState(name=name, active=v, status="serving", versions=[v])
            for name, v in (models or {"digits": "1"}).items()
        }
        self.models.update({m.name: m for m in model_states})
        self.received: list[Command] = []
        self.invalid: list[str] = []
        self.executed: list[str] = []
        self.since = time.time()
        self._replies: dict[str, Reply] = {}  # last reply per command id
        self._commands: queue.Queue[Command] = queue.Queue()
        # transfer id -> chunk bytes by index, while a deploy listens to that transfer
        self._chunks: dict[str, dict[int, bytes]] = {}
        self.chunk_wait_s = chunk_wait_s
        self.chunk_requests_again = 0
        self.chunks_duplicated = 0
        self.lose_chunks = lose_chunks  # the first N chunks "get lost" on the way
        self._chunk_cond = threading.Condition()
        self._subscribed = threading.Event()
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: mqtt.Client | None = None
        self._started_once = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SimDevice:
        self._stop.clear()
        self._subscribed.clear()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.will_set(self.topics.state(self.device), self._state(False).to_bytes(), 1, True)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        # A persistent session, so commands sent while away arrive on reconnect.
        client.connect(
            self.broker.host,
            self.broker.port,
            clean_start=not self._started_once,
            properties=props,
        )
        self._started_once = True
        self._client = client
        client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"{self.device} could not subscribe")
        self._publish(self.topics.state(self.device), self._state(True), retain=True)
        self._threads = [
            threading.Thread(target=self._work, name=f"sim-{self.device}-cmd", daemon=True),
            threading.Thread(target=self._report, name=f"sim-{self.device}-tel", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """A graceful stop: retained state offline, session kept by the broker."""
        self._stop.set()
        for t in self._threads:
            t.join(5)
        client, self._client = self._client, None
        if client is not None:
            info = client.publish(
                self.topics.state(self.device), self._state(False).to_bytes(), 1, True
            )
            info.wait_for_publish(5)
            client.disconnect()
            client.loop_stop()

    def active(self, model: str = "digits") -> str | None:
        return self.models[model].active

    # ------------------------------------------------------------------ messages

    def _state(self, online: bool) -> State:
        return State(
            device=self.device,
            online=online,
            agent_version="sim-0.1",
            runtime=RuntimeInfo(name="simulated", version="0"),
            models=list(self.models.values()),
            pipelines=[
                PipelineState(
                    name=self.pipeline, model="digits", status="running", drift=self.drift_warning
                )
            ],
            groups=self.groups,
            since=self.since,
            ts=time.time(),
        )

    def _publish(self, topic: str, message: Any, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is not None:
            client.publish(topic, message.to_bytes(), qos=qos, retain=retain)

    def _reply(self, cid: str, status: str, code: ReplyCode, message: str = "", **kw: Any) -> None:
        reply = Reply(
            id=cid,
            device=self.device,
            status=status,
            code=code,
            message=message,
            ts=time.time(),
            **kw,
        )
        if cid:
            self._replies[cid] = reply
        self._publish(self.topics.reply(self.device), reply)

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        subs = [(self.topics.cmd(self.device), 1)]
        subs += [(self.topics.group_cmd(g), 1) for g in self.groups]
        client.subscribe(subs)

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        if msg.topic.startswith(f"{self.topics.prefix}/transfer/"):
            self._on_chunk(msg.topic, msg.payload)
            return
        try:
            command = decode_command(msg.payload)
        except ProtocolError as exc:
            self.invalid.append(f"{msg.topic}: {exc.message}")
            self._reply(command_id_of(msg.payload), "failed", exc.code, exc.message)
            return
        self.received.append(command)
        previous = self._replies.get(command.id)
        if previous is not None:  # answered again, never executed twice
            self._publish(self.topics.reply(self.device), previous)
            return
        self._replies[command.id] = Reply(
            id=command.id,
            device=self.device,
            status="accepted",
            code=ReplyCode.ACCEPTED,
            ts=time.time(),
        )
        self._commands.put(command)

    # ------------------------------------------------------------------ commands

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                command = self._commands.get(timeout=0.1)
            except queue.Empty:
                continue
            if command.expires_at is not None and command.expires_at < time.time():
                self._reply(command.id, "failed", ReplyCode.EXPIRED, "command expired")
                continue
            self.executed.append(command.id)
            try:
                if isinstance(command, DeployCommand):
                    data = self._deploy(command)
                else:
                    self._reply(command.id, "accepted", ReplyCode.ACCEPTED)
                    data = self._simple(command)
                self._reply(command.id, "done", ReplyCode.OK, "done", data=data)
            except CommandFailed as exc:
                self._reply(command.id, "failed", exc.code, exc.message)

    def _simple(self, command: Command) -> dict[str, Any]:
        if isinstance(command, PingCommand):
            return {"pong": True}
        if isinstance(command, StatusCommand):
            return {"state": self._state(True).model_dump(mode="json", exclude_none=True)}
        if isinstance(command, RollbackCommand):
            m = self.models.get(command.model)
            target = command.to_version or (m.last_known_good if m else None)
            if m is None or target is None or target not in m.versions:
                raise CommandFailed(ReplyCode.NOT_FOUND, f"no version to roll back to: {target}")
            previous = m.active
            self.models[m.name] = m.model_copy(
                update={"active": target, "status": "serving", "last_known_good": target}
            )
            self._publish(self.topics.state(self.device), self._state(True), retain=True)
            return {"model": m.name, "version": target, "previous": previous}
        return {}

    def _deploy(self, command: DeployCommand) -> dict[str, Any]:
        art = command.artifact
        self._reply(command.id, "accepted", ReplyCode.ACCEPTED)
        try:
            manifest = parse_manifest(command.manifest)
        except BundleError as exc:
            raise CommandFailed(ReplyCode.BAD_MANIFEST, str(exc)) from None
        if self.trusted_keys:
            try:
                verify_signature(command.manifest, command.signature, self.trusted_keys)
            except BundleError as exc:
                raise CommandFailed(ReplyCode.BAD_SIGNATURE, str(exc)) from None
        if isinstance(art, MqttArtifact):
            body = self._receive_chunks(command.id, art)
        else:  # "url" and the older "http" spelling
            body = self._download(command.id, art.url)
        if len(body) != manifest.model.size or (
            hashlib.sha256(body).hexdigest() != manifest.model.sha256
        ):
            raise CommandFailed(ReplyCode.CHECKSUM_MISMATCH, "model sha256 does not match")
        self._reply(command.id, "progress", ReplyCode.IN_PROGRESS, "validating", stage="validating")
        if manifest.version in self.reject:
            code, message = self.reject[manifest.version]
            raise CommandFailed(code, message)
        self._reply(
            command.id, "progress", ReplyCode.IN_PROGRESS, "on probation", stage="probation"
        )
        old = self.models.get(manifest.name)
        previous = old.active if old else None
        versions = [*(old.versions if old else []), manifest.version]
        self.models[manifest.name] = ModelState(
            name=manifest.name,
            active=manifest.version,
            last_known_good=previous,
            status="serving",
            versions=list(dict.fromkeys(versions)),
        )
        self._publish(self.topics.state(self.device), self._state(True), retain=True)
        return {"model": manifest.name, "version": manifest.version, "previous": previous}

    def _subscribe_and_wait(self, topic: str) -> None:
        done = threading.Event()
        client = self._client
        assert client is not None
        previous = client.on_subscribe
        client.on_subscribe = lambda *a: done.set()
        client.subscribe(topic, 1)
        if not done.wait(10):
            raise CommandFailed(ReplyCode.DOWNLOAD_FAILED, "could not subscribe to the transfer")
        client.on_subscribe = previous

    def _download(self, cid: str, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                size = int(response.headers.get("Content-Length") or 0)
                parts: list[bytes] = []
                got = 0
                while block := response.read(16 * 1024):
                    parts.append(block)
                    got += len(block)
                    if size:
                        self._reply(
                            cid,
                            "progress",
                            ReplyCode.IN_PROGRESS,
                            "downloading",
                            stage="downloading",
                            percent=min(100.0, 100.0 * got / size),
                        )
                return b"".join(parts)
        except OSError as exc:
            raise CommandFailed(ReplyCode.DOWNLOAD_FAILED, f"{url}: {exc}") from None

    def _receive_chunks(self, cid: str, art: MqttArtifact) -> bytes:
        """As docs/protocol.md says: subscribe, ask for every chunk, ask again for what
        is still missing after a silence, give up after a few unanswered requests."""
        topic = self.topics.transfer(art.transfer_id)
        self._subscribe_and_wait(topic)
        try:
            with self._chunk_cond:
                self._chunks.setdefault(art.transfer_id, {})
            return self._collect_chunks(cid, art)
        finally:
            if self._client is not None:
                self._client.unsubscribe(topic)
            with self._chunk_cond:
                self._chunks.pop(art.transfer_id, None)

    def _collect_chunks(self, cid: str, art: MqttArtifact) -> bytes:
        total = art.chunks
        reported = -1
        unanswered = 0
        self._request_chunks(art)
        quiet_since = time.monotonic()
        with self._chunk_cond:
            while True:
                have = self._chunks[art.transfer_id]
                if len(have) * 4 // total > reported:
                    reported = len(have) * 4 // total
                    quiet_since = time.monotonic()
                    unanswered = 0
                    self._reply(
                        cid,
                        "progress",
                        ReplyCode.IN_PROGRESS,
                        "downloading",
                        stage="downloading",
                        percent=100.0 * len(have) / total,
                    )
                if len(have) >= total:
                    break
                if time.monotonic() - quiet_since >= self.chunk_wait_s:
                    unanswered += 1
                    if unanswered >= CHUNK_REQUESTS:
                        raise CommandFailed(
                            ReplyCode.DOWNLOAD_FAILED,
                            f"got {len(have)} of {total} chunks after {unanswered} requests",
                        )
                    self.chunk_requests_again += 1
                    self._request_chunks(art)
                    quiet_since = time.monotonic()
                self._chunk_cond.wait(0.1)
            chunks = dict(self._chunks[art.transfer_id])
        if sorted(chunks) != list(range(total)):
            raise CommandFailed(ReplyCode.DOWNLOAD_FAILED, "chunks do not add up")
        return b"".join(chunks[i] for i in range(total))

    def _request_chunks(self, art: MqttArtifact) -> None:
        with self._chunk_cond:
            have = set(self._chunks.get(art.transfer_id, {}))
        missing = [i for i in range(art.chunks) if i not in have][:MAX_MISSING_LISTED]
        request = ChunkRequest(
            transfer_id=art.transfer_id, device=self.device, missing=missing, ts=time.time()
        )
        self._publish(self.topics.transfer_missing(art.transfer_id), request)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            chunk = Chunk.model_validate_json(payload)
            data = base64.b64decode(chunk.data, validate=True)
        except ValueError as exc:
            self.invalid.append(f"{topic}: {exc}")
            return
        if self.lose_chunks > 0:
            self.lose_chunks -= 1
            return
        if chunk.sha256 is None:
            self.invalid.append(f"{topic}: chunk {chunk.index} has no sha256")
            return
        if hashlib.sha256(data).hexdigest() != chunk.sha256:
            self.invalid.append(f"{topic}: chunk {chunk.index} fails its sha256")
            return
        with self._chunk_cond:
            have = self._chunks.get(chunk.transfer_id)
            if have is None:  # not listening to this transfer (any more)
                return
            if chunk.index in have:
                self.chunks_duplicated += 1
            have[chunk.index] = data
            self._chunk_cond.notify_all()

    # ------------------------------------------------------------------ telemetry

    def _report(self) -> None:
        while not self._stop.is_set():
            active = self.models.get("digits")
            version = active.active if active else None
            self._seq += 1
            self._publish(
                self.topics.telemetry(self.device),
                Telemetry(
                    device=self.device,
                    seq=self._seq,
                    ts=time.time(),
                    uptime_s=time.time() - self.since,
                    cpu_percent=12.5,
                    temperature_c=47.5,
                    outbox_depth=3,
                    pipelines={
                        self.pipeline: PipelineTelemetry(
                            model="digits",
                            version=version,
                            fps=14.5,
                            invoke_ms_p50=3.0,
                            invoke_ms_p95=4.25,
                            frames_in=100,
                            results_out=99,
                            source_state="open",
                            drift=self.drift,
                        )
                    },
                ),
                qos=0,
            )
            if self.publish_results:
                self._seq += 1
                self._publish(
                    self.topics.results(self.device, self.pipeline),
                    Result(
                        device=self.device,
                        pipeline=self.pipeline,
                        seq=self._seq,
                        ts=time.time(),
                        frame=self._seq,
                        model="digits",
                        version=version or "-",
                        latency_ms=4.0,
                        classes=[ClassScore(index=7, label="7", score=0.9)],
                    ),
                )
            self._stop.wait(self.telemetry_interval)


# -------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


def make_keys(directory: Path) -> Keys:
    private, public = generate_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "signing.pem").write_bytes(private)
    (directory / "signing.pub").write_bytes(public)
    return Keys(directory / "signing.pem", directory / "signing.pub")


def make_bundle(
    dest: Path, model: bytes, *, version: str, keys: Keys | None, name: str = "digits"
) -> Path:
    """A small valid bundle; signed when keys are given."""
    manifest = manifest_of(model, version=version, name=name)
    signature = sign_manifest(manifest, load_private_key(keys.private)) if keys else None
    return write_bundle(dest, model, manifest, signature)


def manifest_of(model: bytes, *, version: str, name: str = "digits") -> dict[str, Any]:
    """A valid manifest of a small int8 classifier for ``model``'s bytes."""
    return {
        "format": 1,
        "name": name,
        "version": version,
        "created_at": "2025-01-01T00:00:00Z",
        "task": "classify",
        "quantization": "int8",
        "model": {
            "file": "model.tflite",
            "sha256": hashlib.sha256(model).hexdigest(),
            "size": len(model),
        },
        "inputs": [{"name": "input", "shape": [1, 8, 8, 1], "dtype": "int8"}],
        "outputs": [{"name": "output", "shape": [1, 10], "dtype": "int8"}],
        "producer": {"converter": "tests"},
    }


# ---------------------------------------------------------------------------- CLI


def fleet_args(broker: Broker, prefix: str) -> list[str]:
    return ["--broker", f"{broker.host}:{broker.port}", "--prefix", prefix]


def run_fleet(
    broker: Broker, prefix: str, command: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m fleet COMMAND --broker ... --prefix ... ARGS`` (inherits PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", "fleet", command, *fleet_args(broker, prefix), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))},
    )


def start_fleet(broker: Broker, prefix: str, command: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", command, *fleet_args(broker, prefix), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (rc {proc.returncode}): {proc.stdout!r} {proc.stderr!r}"
        ) from None
    assert isinstance(data, dict)
    return data


def deploy_over_mqtt(
    broker: Any, device: str, pub: Path, bundle: Path, *args: str
) -> tuple[int, dict[str, Any]]:
    """``edge-fleet deploy BUNDLE --device DEVICE --via mqtt --json`` as a user runs it:
    (exit code, the device's row of the JSON summary)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "deploy", str(bundle),
         "--broker", f"{broker.host}:{broker.port}", "--device", device,
         "--pub", str(pub), "--via", "mqtt", "--timeout", "120", "--json", *args],
        capture_output=True, text=True, timeout=180, cwd=root,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(root))},
    )  # fmt: skip
    try:
        (row,) = json.loads(proc.stdout.strip().splitlines()[-1])["devices"]
    except (ValueError, IndexError):
        raise AssertionError(f"rc {proc.returncode}: {proc.stdout!r} {proc.stderr!r}") from None
    return proc.returncode, row


def tiny_agent_config(
    workdir: Path,
    broker: Broker,
    *,
    device: str,
    prefix: str,
    trusted_key: Path,
    pipeline: str = "cam",
    model: str = "tiny",
    fps: float = 20,
    probation: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
) -> Path:
    """An agent's config file (agent.yaml in ``workdir``) for one pipeline of 8x8 grey
    synthetic frames serving ``model``, trusting ``trusted_key``, quick to probation."""
    config = {
        "device": {"id": device},
        "state_dir": str(workdir / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        "runtime": {"num_threads": 1},
        "models": {
            "trusted_keys": [str(trusted_key)],
            "probation": {"duration_s": 1.0, "min_inferences": 3, **(probation or {})},
            **(models or {}),
        },
        "pipelines": [{
            "name": pipeline, "model": model,
            "source": {"type": "synthetic", "kind": "frames", "width": 8, "height": 8,
                       "channels": 1, "fps": fps},
        }],
        "transfer": {"chunk_wait_s": 2.0},
    }  # fmt: skip
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
