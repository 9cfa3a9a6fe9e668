"""Which MQTT 5 response topics the device answers on.

A command may name a response topic; without a rule, anyone who can publish a
command could make the device publish on any topic, even its own retained
``state`` or another device's topics. A response topic is honoured only when it
matches one of ``mqtt.reply_topics`` (default: the device's own reply topic and
``<prefix>/replies/#``) and is not a device, group or transfer topic of the
protocol other than this device's ``reply``. Otherwise the reply goes to the
device's own reply topic, with the correlation data.
"""

from __future__ import annotations

from agent import protocol as p
from agent.link.command_record import Route

MAX_RESPONSE_TOPIC = 512


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest), where a filter
    starting with a wildcard never matches a ``$`` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return i == len(parts) - 1
        if i >= len(levels):
            return False
        if part != "+" and part != levels[i]:
            return False
    return len(parts) == len(levels)


class ReplyRoutes:
    def __init__(self, topics: p.Topics, device: str, filters: list[str] | None = None) -> None:
        self._topics = topics
        self._device = device
        self.default = topics.reply(device)
        self.filters = list(filters) if filters is not None else [
            self.default, f"{topics.prefix}/replies/#"
        ]  # fmt: skip

    def route(self, response_topic: str | None, correlation_data: bytes | None) -> Route:
        if response_topic is not None and self.allowed(response_topic):
            return Route(response_topic, correlation_data)
        return Route(self.default, correlation_data)

    def allowed(self, topic: str) -> bool:
        if not topic or len(topic) > MAX_RESPONSE_TOPIC:
            return False
        if "+" in topic or "#" in topic or "\x00" in topic:
            return False
        if topic == self.default:
            return True
        if not any(topic_matches(f, topic) for f in self.filters):
            return False
        return not self._is_protocol_topic(topic)

    def _is_protocol_topic(self, topic: str) -> bool:
        prefix = self._topics.prefix + "/"
        if not topic.startswith(prefix):
            return False
        first = topic[len(prefix) :].split("/", 1)[0]
        if first in p.RESERVED_DEVICE_IDS:
            return True  # group commands and transfers
        try:
            self._topics.parse(topic)
        except p.ProtocolError:
            return False
        return True  # some device's cmd, reply, state, telemetry or results
