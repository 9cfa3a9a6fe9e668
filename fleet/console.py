"""The console's MQTT client: what the fleet says (states, telemetry, replies) and commands.

One ``Console`` owns one paho client (MQTT 5). Its network thread parses every
message with the ``agent.protocol`` models, keeps the latest retained state and
telemetry per device (the fleet view, guarded by a lock), and puts an event on
``events`` for whoever drives a rollout or a watch. Replies are matched to
commands by their id: the console listens on the documented
``<prefix>/<device>/reply`` topics.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from agent.protocol import (
    DEFAULT_PREFIX,
    PROTOCOL_VERSION,
    Command,
    ProtocolError,
    Reply,
    Result,
    State,
    Telemetry,
    Topics,
    format_validation_error,
    read_message,
)

from .signing import CommandSigner

log = logging.getLogger(__name__)


class ConsoleError(Exception):
    """The broker cannot be reached or refuses us; one-line message."""


@dataclass(frozen=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.uses_tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.cafile is not None or self.certfile is not None


# Events, in the order the broker delivered them ------------------------------------


@dataclass(frozen=True)
class StateEvent:
    device: str
    state: State
    received: float


@dataclass(frozen=True)
class TelemetryEvent:
    device: str
    telemetry: Telemetry
    received: float


@dataclass(frozen=True)
class ReplyEvent:
    device: str
    reply: Reply
    received: float


@dataclass(frozen=True)
class ResultEvent:
    device: str
    result: Result
    received: float


@dataclass(frozen=True)
class InvalidEvent:
    """A message on a fleet topic that does not follow the protocol."""

    topic: str
    problem: str
    received: float


Event = StateEvent | TelemetryEvent | ReplyEvent | ResultEvent | InvalidEvent


@dataclass(frozen=True)
class DeviceView:
    """What the console knows of one device."""

    device: str
    state: State | None = None
    telemetry: Telemetry | None = None
    last_seen: float | None = None

    @property
    def online(self) -> bool:
        return self.state is not None and self.state.online

    @property
    def groups(self) -> list[str]:
        return list(self.state.groups) if self.state else []


@dataclass
class _Subscriptions:
    pending: set[int] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)


class Console:
    """An MQTT 5 client that watches the fleet and sends commands."""

    def __init__(
        self,
        options: BrokerOptions,
        *,
        results: bool = False,
        signer: CommandSigner | None = None,
        share_group: str | None = None,
    ) -> None:
        self.options = options
        # Several fleet-server processes share replies and telemetry through an MQTT 5
        # shared subscription ($share/<group>/...): each message reaches one of them.
        # Retained states are never delivered to shared subscriptions, so every
        # process subscribes to them directly.
        self.share_group = share_group
        # Signs every command this console sends (devices that require signed commands
        # refuse the rest); a fleet server sends through a Console and signs the same way.
        self.signer = signer
        self.topics = Topics(options.prefix)
        self.events: queue.Queue[Event] = queue.Queue()
        self._results = results
        self._lock = threading.Lock()
        self._views: dict[str, DeviceView] = {}
        self._last_state_at = 0.0
        self._newer_protocol: set[str] = set()  # devices already warned about (MQTT thread)
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._subs = _Subscriptions()
        # Topics beyond the fleet view (a transfer's chunk requests): exact topic -> handler.
        self._handlers: dict[str, Callable[[bytes], None]] = {}
        self._acks: dict[int, threading.Event] = {}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-fleet-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        # Chunked transfers queue many QoS 1 messages at once.
        self._client.max_inflight_messages_set(64)

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, subscribe to the fleet topics, and wait until the broker confirmed both."""
        o = self.options
        if o.username is not None:
            self._client.username_pw_set(o.username, o.password)
        if o.uses_tls:
            try:
                self._client.tls_set(
                    ca_certs=str(o.cafile) if o.cafile else None,
                    certfile=str(o.certfile) if o.certfile else None,
                    keyfile=str(o.keyfile) if o.keyfile else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConsoleError(f"TLS setup failed: {exc}") from None
        try:
            self._client.connect(o.host, o.port, keepalive=o.keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise ConsoleError(f"cannot connect to the broker at {o.url}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout) or self._connect_error:
            self.close()
            raise ConsoleError(
                f"broker at {o.url} refused the connection: {self._connect_error}"
                if self._connect_error
                else f"no answer from the broker at {o.url} within {timeout:g}s"
            )
        if not self._subs.done.wait(max(0.1, deadline - time.monotonic())):
            self.close()
            raise ConsoleError(f"broker at {o.url} did not confirm the subscriptions")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Console:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def local_address(self) -> str:
        """The local IP the broker connection uses: a good guess at what devices can reach."""
        sock = self._client.socket()
        getsockname = getattr(sock, "getsockname", None)
        if getsockname is None:
            return "127.0.0.1"
        return str(getsockname()[0])

    # ------------------------------------------------------------------ the view

    def devices(self) -> dict[str, DeviceView]:
        with self._lock:
            return dict(self._views)

    def view(self, device: str) -> DeviceView:
        with self._lock:
            return self._views.get(device, DeviceView(device))

    def wait_for_retained(self, quiet: float = 0.3, timeout: float = 3.0) -> None:
        """Let the retained states arrive: until none came for ``quiet`` seconds."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with self._lock:
                last = self._last_state_at
            since = time.monotonic() - max(last, start)
            if since >= quiet:
                return
            time.sleep(min(0.05, quiet - since))

    def subscribe(
        self, topic: str, handler: Callable[[bytes], None], timeout: float = 10.0
    ) -> None:
        """Call ``handler(payload)`` (on the MQTT thread) for every message on ``topic``;
        returns once the broker confirmed the subscription."""
        confirmed = threading.Event()
        # Held until the mid is registered, so a quick SUBACK cannot slip past it.
        with self._lock:
            self._handlers[topic] = handler
            result, mid = self._client.subscribe(self._shared(topic), 1)
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise ConsoleError(f"cannot subscribe to {topic}: {mqtt.error_string(result)}")
            self._acks[mid] = confirmed
        if not confirmed.wait(timeout):
            raise ConsoleError(f"the broker did not confirm the subscription to {topic}")

    def unsubscribe(self, topic: str) -> None:
        """Stop calling the handler of ``topic`` and leave its subscription (a server that
        no longer serves a transfer must not take the shared requests for it)."""
        with self._lock:
            if self._handlers.pop(topic, None) is None:
                return
        self._client.unsubscribe(self._shared(topic))

    def _shared(self, topic: str) -> str:
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic

    # ------------------------------------------------------------------ sending

    def send(self, device: str, command: Command, timeout: float = 10.0) -> None:
        """Publish a command to one device (QoS 1) and wait for the broker's ack."""
        self.send_many([(device, command)], timeout=timeout)

    def send_many(self, commands: Iterable[tuple[str, Command]], timeout: float = 30.0) -> None:
        """Publish commands to many devices at once, then wait for every ack."""
        messages = [(self.topics.cmd(d), self.command_payload(d, c)) for d, c in commands]
        self.publish_many(messages, timeout=timeout)

    def command_payload(self, device: str, command: Command) -> bytes:
        """The bytes sent to ``device`` for ``command``: signed for that one device when
        the console has a signer, so a copy published elsewhere is refused there."""
        if self.signer is None:
            return command.to_bytes()
        return self.signer.payload(f"device/{device}", command)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, timeout: float = 10.0) -> None:
        self.publish_many([(topic, payload)], qos=qos, timeout=timeout)

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, timeout: float = 30.0
    ) -> None:
        """Publish several messages and wait until the broker acknowledged every one."""
        infos = [self._client.publish(topic, payload, qos=qos) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                raise ConsoleError(f"publish failed: {mqtt.error_string(info.rc)}")
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise ConsoleError(f"the broker did not acknowledge a publish within {timeout:g}s")

    # ------------------------------------------------------------------ callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            self._connected.set()
            return
        t = self.topics
        wanted = [t.all_states()] + [
            self._shared(topic) for topic in (t.all_replies(), t.all_telemetry())
        ]
        if self._results:
            wanted.append(self._shared(t.all_results()))
        with self._lock:
            # Again after a reconnect: the session is clean.
            wanted += [self._shared(topic) for topic in self._handlers]
        result, mid = client.subscribe([(w, 1) for w in wanted])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subs.pending.add(mid)
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        with self._lock:
            ack = self._acks.pop(mid, None)
        if ack is not None:
            if not any(rc.is_failure for rc in reason_codes):
                ack.set()
            return
        self._subs.pending.discard(mid)
        if not self._subs.pending:
            self._subs.done.set()

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        now = time.time()
        with self._lock:
            handler = self._handlers.get(msg.topic)
        if handler is not None:
            handler(msg.payload)
            return
        try:
            device, kind, _pipeline = self.topics.parse(msg.topic)
        except ProtocolError:
            return
        try:
            event = self._parse(msg.topic, device, kind, msg.payload, now)
        except ValidationError as err:
            problem = format_validation_error(err)
            log.warning("invalid %s message on %s: %s", kind, msg.topic, problem)
            self.events.put(InvalidEvent(msg.topic, problem, now))
            return
        if event is None:
            return
        if isinstance(event, InvalidEvent):
            log.warning("invalid message on %s: %s", msg.topic, event.problem)
        else:
            self._update_view(event)
        self.events.put(event)

    def _parse(
        self, topic: str, device: str, kind: str, payload: bytes, now: float
    ) -> Event | None:
        # read_message: keys a newer device adds are left out, not refused.
        if kind == "state":
            state = read_message(payload, State)
            if state.device != device:
                return InvalidEvent(topic, f"carries the state of {state.device!r}", now)
            self._note_protocol(state)
            return StateEvent(device, state, now)
        if kind == "telemetry":
            return TelemetryEvent(device, read_message(payload, Telemetry), now)
        if kind == "reply":
            return ReplyEvent(device, read_message(payload, Reply), now)
        if kind == "results":
            return ResultEvent(device, read_message(payload, Result), now)
        return None

    def _note_protocol(self, state: State) -> None:
        """Warn once per device that speaks a newer protocol than this console: its
        messages are read without the keys this console does not know, and commands may
        mean something else to it."""
        if state.protocol <= PROTOCOL_VERSION or state.device in self._newer_protocol:
            return
        self._newer_protocol.add(state.device)
        log.warning(
            "device %s speaks protocol %d, this console %d: upgrade edge-fleet before "
            "commanding it",
            state.device,
            state.protocol,
            PROTOCOL_VERSION,
        )

    def _update_view(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, InvalidEvent):
                return
            view = self._views.get(event.device, DeviceView(event.device))
            if isinstance(event, StateEvent):
                view = DeviceView(
                    view.device, event.state, view.telemetry, _later(view.last_seen, event.state.ts)
                )
                self._last_state_at = time.monotonic()
            elif isinstance(event, TelemetryEvent):
                ts = event.telemetry.ts
                view = DeviceView(
                    view.device, view.state, event.telemetry, _later(view.last_seen, ts)
                )
            elif isinstance(event, ReplyEvent):
                ts = event.reply.ts
                view = DeviceView(
                    view.device, view.state, view.telemetry, _later(view.last_seen, ts)
                )
            else:
                ts = event.result.ts
                view = DeviceView(
                    view.device, view.state, view.telemetry, _later(view.last_seen, ts)
                )
            self._views[event.device] = view


def _later(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)
