"""The device's MQTT connection: paho-mqtt 2.x behind the ``Link`` interface.

One thread (``mqtt-link``) owns the socket: it connects, runs paho's loop (on
``poll()``, see ``netloop``) and reconnects with exponential backoff and jitter.
The link counts as connected only after a successful CONNACK. The session is
persistent (MQTT 5: clean start off and a session expiry; 3.1.1: clean session
off), so QoS 1 commands sent while the device was away arrive when it comes back,
and paho resends unacknowledged QoS 1 publishes after a reconnect. On every connect
the retained state is published; the last will (retained) and a graceful stop both
say ``online: false``.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent import protocol as p
from agent.config import AgentConfig, MqttConfig
from agent.link.base import AckCallback, Handler, Incoming
from agent.link.netloop import PollLoop
from agent.threads import SUPPORT_NICE, lower_priority

log = logging.getLogger(__name__)

StateProvider = Callable[[], p.State]


# Room in a packet besides the payload: fixed header, topic (the device's longest
# topic is well under 1 KiB) and MQTT 5 properties (response topic up to the 512
# characters the dispatcher accepts, correlation data, user properties).
_PACKET_OVERHEAD_BYTES = 8 * 1024


def max_incoming_packet_bytes() -> int:
    """The MQTT 5 Maximum Packet Size the device announces at CONNECT.

    Nothing the device accepts is larger: a command is at most
    ``MAX_COMMAND_BYTES``, and the largest ``Chunk`` is the base64 of a chunk of
    the largest ``chunk_size`` a deploy may name, plus its JSON. The broker then
    drops larger publishes for this client instead of sending them (MQTT 5,
    3.1.2.11.4), so a 256 MB publish is never copied into the agent.
    """
    largest = max(p.MAX_COMMAND_BYTES, p.max_chunk_message_bytes(p.MAX_COMMAND_BYTES))
    return largest + _PACKET_OVERHEAD_BYTES


class LinkError(Exception):
    """The link cannot be set up from this config (one line naming the cause)."""


def resolve_password(mqtt_config: MqttConfig) -> str | None:
    """The MQTT password from the inline value, a file or an environment variable."""
    if mqtt_config.password is not None:
        return mqtt_config.password
    if mqtt_config.password_file is not None:
        try:
            return mqtt_config.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise LinkError(
                f"mqtt.password_file: cannot read {mqtt_config.password_file}: "
                f"{exc.strerror or exc}"
            ) from None
    if mqtt_config.password_env is not None:
        value = os.environ.get(mqtt_config.password_env)
        if value is None:
            raise LinkError(
                f"mqtt.password_env: environment variable {mqtt_config.password_env} is not set"
            )
        return value
    return None


def tls_context(mqtt_config: MqttConfig) -> ssl.SSLContext:
    tls = mqtt_config.tls
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise LinkError(f"mqtt.tls: cannot load certificates: {exc}") from None
    context.check_hostname = tls.verify_hostname
    return context


class Backoff:
    """Exponential delays between ``min_s`` and ``max_s``, each jittered to 50-100 %."""

    def __init__(
        self, min_s: float, max_s: float, rand: Callable[[], float] = random.random
    ) -> None:
        self.min_s, self.max_s = min_s, max(min_s, max_s)
        self._rand = rand
        self._attempt = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.min_s * 2.0 ** min(self._attempt, 30))
        self._attempt += 1
        return base * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        self._attempt = 0


class MqttLink:
    """The ``Link`` over a real broker. ``start()`` returns at once; it connects in the
    background and keeps reconnecting until ``stop()``."""

    def __init__(
        self,
        config: AgentConfig,
        state_provider: StateProvider | None = None,
        agent_version: str = __version__,
    ) -> None:
        self._config = config
        self._mqtt = config.mqtt
        self.device = config.device.id
        self.topics = p.Topics(config.mqtt.topic_prefix)
        self._agent_version = agent_version
        self._since = time.time()
        self._state_provider = state_provider
        self._backoff = Backoff(self._mqtt.reconnect.min_delay_s, self._mqtt.reconnect.max_delay_s)
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._connect_listeners: list[Callable[[], None]] = []
        self._pending_acks: dict[int, AckCallback | None] = {}
        self._early_acks: dict[int, bool] = {}
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._loop: PollLoop | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.heartbeat = time.monotonic()  # the network loop's, for the supervisor

    # ------------------------------------------------------------------ Link interface

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckCallback | None = None,
        correlation_data: bytes | None = None,
    ) -> bool:
        client = self._client
        if client is None:
            return False
        properties = None
        if correlation_data is not None and self._is_v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except (ValueError, TypeError) as exc:
            log.warning("cannot publish to %s: %s", topic, exc)
            return False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("cannot publish to %s: %s", topic, mqtt.error_string(info.rc))
            return False
        if qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False
        # The PUBACK may beat us here (paho calls on_publish on its own thread), so
        # every mid is registered, and an acknowledgement seen first is parked.
        with self._lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._pending_acks[info.mid] = on_ack
        if early is not None and on_ack is not None:
            on_ack(early)
        return True

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
        client = self._client
        if client is not None and self.connected:
            client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        client = self._client
        if client is not None and self.connected:
            client.unsubscribe(topic_filter)

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._connect_listeners.append(listener)

    # ------------------------------------------------------------------------- state

    def set_state_provider(self, provider: StateProvider) -> None:
        self._state_provider = provider

    def state(self, online: bool = True) -> p.State:
        base: p.State | None = None
        if self._state_provider is not None:
            try:
                base = self._state_provider()
            except Exception:
                log.exception("state provider failed; publishing the basic state")
        if base is None:
            base = p.State(
                device=self.device,
                online=online,
                agent_version=self._agent_version,
                groups=list(self._config.device.groups),
                since=self._since,
                ts=time.time(),
            )
        return base.model_copy(update={"online": online, "ts": time.time()})

    def publish_state(self) -> bool:
        """Publish the retained state now (on connect, and whenever a model changes)."""
        return self.publish(self.topics.state(self.device), self.state().to_bytes(), retain=True)

    def status(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "broker": f"{self._mqtt.host}:{self._mqtt.port}",
            "connects": self.connects,
            "last_error": self.last_error,
        }

    # --------------------------------------------------------------------- lifecycle

    @property
    def _is_v5(self) -> bool:
        return self._mqtt.protocol == "5"

    def start(self) -> None:
        if self._thread is not None:
            return
        self._client = self._make_client()
        self._loop = PollLoop(self._client)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Say ``online: false`` (retained), disconnect cleanly and end the thread."""
        client, thread = self._client, self._thread
        if client is None or thread is None:
            return
        if self.connected:
            info = client.publish(
                self.topics.state(self.device), self.state(online=False).to_bytes(), 1, True
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline state: %s", exc)
        self._stop.set()
        thread.join(timeout + 2)
        if self._loop is not None:
            self._loop.close()  # the DISCONNECT below is then written by this thread
            self._loop = None
        client.disconnect()
        self._connected.clear()
        self._thread = None
        self._client = None

    def thread(self) -> threading.Thread | None:
        """The network thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def _make_client(self) -> mqtt.Client:
        mqtt_config = self._mqtt
        if self._is_v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.device,
                protocol=MQTTProtocolVersion.MQTTv5,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.device,
                protocol=MQTTProtocolVersion.MQTTv311,
                clean_session=False,
            )
        if mqtt_config.username is not None:
            client.username_pw_set(mqtt_config.username, resolve_password(mqtt_config))
        if mqtt_config.tls.enabled:
            client.tls_set_context(tls_context(mqtt_config))
        client.max_inflight_messages_set(self._config.outbox.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _set_will(self, client: mqtt.Client) -> None:
        """Registered anew before every connect, so the will's ``ts`` is the time of
        the connection it belongs to (the device was online at least until then)
        and its models are those of that moment, not of the first connect."""
        client.will_set(
            self.topics.state(self.device),
            self.state(online=False).to_bytes(),
            qos=1,
            retain=True,
        )

    def _connect(self, client: mqtt.Client) -> None:
        mqtt_config = self._mqtt
        self._set_will(client)
        if self._is_v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = mqtt_config.session_expiry_s
            properties.MaximumPacketSize = max_incoming_packet_bytes()
            client.connect(
                mqtt_config.host,
                mqtt_config.port,
                mqtt_config.keepalive_s,
                clean_start=False,
                properties=properties,
            )
        else:
            client.connect(mqtt_config.host, mqtt_config.port, mqtt_config.keepalive_s)

    def _run(self) -> None:
        lower_priority(SUPPORT_NICE)
        client = self._client
        assert client is not None
        socket_open = False
        connects_at_open = 0
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if not socket_open:
                try:
                    self._connect(client)
                    socket_open = True
                    connects_at_open = self.connects
                except (OSError, ValueError) as exc:
                    self._report(f"cannot connect to {self._mqtt.host}:{self._mqtt.port}: {exc}")
                    self._stop.wait(self._backoff.next_delay())
                    continue
            loop = self._loop
            rc = loop.once(0.5) if loop is not None else MQTTErrorCode.MQTT_ERR_NO_CONN
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stop.is_set():
                socket_open = False
                if self.connects == connects_at_open:
                    # Closed before any CONNACK: typically a TLS client certificate the
                    # broker rejected (TLS 1.3 reports that only after the handshake).
                    self._report(
                        f"connection to {self._mqtt.host}:{self._mqtt.port} closed before the "
                        f"broker accepted it ({mqtt.error_string(rc)}): client certificate "
                        "rejected, or not an MQTT broker?"
                    )
                self._connected.clear()
                self._stop.wait(self._backoff.next_delay())

    def _report(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message

    # --------------------------------------------------- paho callbacks (network thread)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._report(f"broker refused the connection: {reason_code}")
            return
        self.connects += 1
        self.last_error = None
        self._backoff.reset()
        self._connected.set()
        log.info(
            "connected to %s:%s (session present: %s)",
            self._mqtt.host,
            self._mqtt.port,
            flags.session_present,
        )
        with self._lock:
            subscriptions = [(f, qos) for f, (_h, qos) in self._handlers.items()]
            listeners = list(self._connect_listeners)
        if subscriptions:
            client.subscribe(subscriptions)
        self.publish_state()
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("connect listener failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._stop.is_set():
            self._report(f"disconnected from {self._mqtt.host}:{self._mqtt.port}: {reason_code}")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return
        props = getattr(msg, "properties", None)
        incoming = Incoming(
            topic=topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        with self._lock:
            handlers = [
                h for f, (h, _q) in self._handlers.items() if mqtt.topic_matches_sub(f, topic)
            ]
        for handler in handlers:
            try:
                handler(incoming)
            except Exception:
                log.exception("message handler for %s failed", topic)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason_code.is_failure
        with self._lock:
            if mid in self._pending_acks:
                callback = self._pending_acks.pop(mid)
            else:
                callback = None
                self._early_acks[mid] = ok
        if callback is not None:
            try:
                callback(ok)
            except Exception:
                log.exception("publish acknowledgement callback failed")
