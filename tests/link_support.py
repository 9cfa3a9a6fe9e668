"""Helpers for the link tests: an in-memory Link, a persistent-session collector,
configs and certificates."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol as p
from agent.config import AgentConfig, parse_config
from agent.link.base import AckCallback, Handler, Incoming
from tests.mqtt_support import Broker, Received


def make_config(
    state_dir: Path, broker: Broker | None = None, device: str = "pi-1", **sections: Any
) -> AgentConfig:
    data: dict[str, Any] = {
        "device": {"id": device, "groups": ["kitchen"]},
        "state_dir": str(state_dir),
        "models": {"require_signature": False},
        "mqtt": {"reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5}},
    }
    if broker is not None:
        data["mqtt"].update(host=broker.host, port=broker.port)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None
    on_ack: AckCallback | None = field(repr=False, default=None)


class FakeLink:
    """The Link interface in memory: records publishes, acknowledges them at once
    (or holds them when ``auto_ack`` is off), and delivers messages to handlers."""

    def __init__(self, connected: bool = True, auto_ack: bool = True) -> None:
        self._connected = connected
        self.auto_ack = auto_ack
        self.published: list[Published] = []
        self.handlers: dict[str, Handler] = {}
        self.listeners: list[Callable[[], None]] = []
        self._cond = threading.Condition()

    @property
    def connected(self) -> bool:
        return self._connected

    def set_connected(self, value: bool) -> None:
        self._connected = value
        if value:
            for listener in list(self.listeners):
                listener()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckCallback | None = None,
        correlation_data: bytes | None = None,
    ) -> bool:
        if not self._connected and qos == 0:
            return False
        with self._cond:
            self.published.append(Published(topic, payload, qos, retain, correlation_data, on_ack))
            self._cond.notify_all()
        if self.auto_ack and self._connected and on_ack is not None:
            on_ack(True)
        return True

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self.handlers[topic_filter] = handler

    def unsubscribe(self, topic_filter: str) -> None:
        self.handlers.pop(topic_filter, None)

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def deliver(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        incoming = Incoming(topic=topic, payload=payload, qos=1, **kwargs)
        for topic_filter, handler in list(self.handlers.items()):
            if mqtt.topic_matches_sub(topic_filter, topic):
                handler(incoming)

    def wait_for(
        self, predicate: Callable[[list[Published]], bool], timeout: float = 10.0
    ) -> list[Published]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.published), timeout):
                raise AssertionError(f"condition not met; published: {self.published[-5:]}")
            return list(self.published)


class FakeTarget:
    """Records calls; ``deploy`` can be made to block or fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_with: p.CommandFailed | None = None
        self.refuse_before_download: p.CommandFailed | None = None
        self.model_bytes: list[bytes] = []

    def deploy(
        self,
        manifest: dict[str, Any],
        signature: str | None,
        model_file: Path,
        pipeline: str | None,
        progress: p.Progress,
    ) -> dict[str, Any]:
        self.calls.append(("deploy", manifest.get("name")))
        self.model_bytes.append(model_file.read_bytes())
        progress("validating", None)
        self.release.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        return {"model": manifest.get("name"), "version": manifest.get("version")}

    def check_deploy(self, model: str, pipeline: str | None) -> None:
        if self.refuse_before_download is not None:
            raise self.refuse_before_download

    def rollback(self, model: str, to_version: str | None, progress: p.Progress) -> dict[str, Any]:
        self.calls.append(("rollback", model))
        if self.fail_with is not None:
            raise self.fail_with
        return {"model": model, "version": to_version or "1"}

    def model_states(self) -> list[p.ModelState]:
        return [p.ModelState(name="digits", active="1", status="serving")]

    def status(self) -> dict[str, Any]:
        return {"uptime_s": 1.0}

    def apply_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("config", changes))
        if "bad" in changes:
            raise p.CommandFailed(p.ReplyCode.CONFIG_REJECTED, "no such option: bad")
        return {"applied": sorted(changes)}

    def restart(self, pipeline: str | None) -> dict[str, Any]:
        self.calls.append(("restart", pipeline))
        raise RuntimeError("boom")


class SessionCollector:
    """A subscriber with a persistent session (like a real consumer), so messages
    published while it is reconnecting are queued for it by the broker."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str | None = None) -> None:
        self.messages: list[Received] = []
        self.correlations: list[bytes | None] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sess-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector could not subscribe")

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        props = getattr(msg, "properties", None)
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), msg.qos))
            self.correlations.append(getattr(props, "CorrelationData", None))
            self._cond.notify_all()

    def wait_until(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0
    ) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(
                    f"condition not met in {timeout}s; {len(self.messages)} message(s), "
                    f"last: {[(m.topic, m.payload[:60]) for m in self.messages[-3:]]}"
                )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    san: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # Python 3.13's default TLS context is X509-strict: a certificate without these
        # key identifiers fails ("Missing Authority Key Identifier").
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA, and a
    client certificate from a rogue CA the broker does not trust."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = _key(), _key()
    server_key, client_key, rogue_key = _key(), _key(), _key()
    ca = _cert("edge-test-ca", ca_key, "edge-test-ca", ca_key, ca=True)
    return Pki(
        ca_cert=_write_cert(ca, directory / "ca.pem"),
        server_cert=_write_cert(
            _cert("127.0.0.1", server_key, "edge-test-ca", ca_key, san=True),
            directory / "server.pem",
        ),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=_write_cert(
            _cert("pi-tls", client_key, "edge-test-ca", ca_key), directory / "client.pem"
        ),
        client_key=_write_key(client_key, directory / "client.key"),
        rogue_cert=_write_cert(
            _cert("pi-tls", rogue_key, "rogue-ca", rogue_ca_key), directory / "rogue.pem"
        ),
        rogue_key=_write_key(rogue_key, directory / "rogue.key"),
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def model_manifest(data: bytes, name: str = "digits", version: str = "2") -> dict[str, Any]:
    """A valid manifest (as parse_manifest wants it) for a model file of these bytes."""
    return {
        "format": 1,
        "name": name,
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "task": "classify",
        "quantization": "int8",
        "model": {
            "file": "model.tflite",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        },
        "inputs": [{"name": "input", "shape": [1, 8, 8, 1], "dtype": "int8"}],
        "outputs": [{"name": "output", "shape": [1, 10], "dtype": "int8"}],
        "producer": {"converter": "tests"},
    }
