"""The small interface the command plane, outbox and transfers use to talk MQTT.

``MqttLink`` (client.py) implements it over paho-mqtt; unit tests use an in-memory
implementation. Keeping the rest of the link behind it means none of those parts
knows about sockets, TLS or reconnects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Incoming:
    """One received message, independent of the MQTT library."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    # MQTT 5 request/response: where the sender wants the answer, and what to echo.
    response_topic: str | None = None
    correlation_data: bytes | None = None


# Called on the network thread: must only hand the message over (queue.put), never block.
Handler = Callable[[Incoming], None]
# Called once the broker has acknowledged a QoS 1 publish (PUBACK); ``ok`` is False
# when the broker refused the message (MQTT 5 reason code >= 0x80).
AckCallback = Callable[[bool], None]


class Link(Protocol):
    @property
    def connected(self) -> bool:
        """True only between a successful CONNACK and the next disconnect."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckCallback | None = None,
        correlation_data: bytes | None = None,
    ) -> bool:
        """Queue a message for sending; False if it could not even be queued.

        QoS 1 messages queued while disconnected are sent after the reconnect.
        """
        ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``, now and after every
        reconnect."""
        ...

    def unsubscribe(self, topic_filter: str) -> None: ...

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the network thread; must not block) after every successful CONNACK."""
        ...
