"""Home Assistant MQTT discovery: the device, its sensors and its buttons in one message.

With ``integrations.home_assistant.enabled`` the agent publishes one retained
device-based discovery message on ``<discovery_prefix>/device/<object id>/config``
at every connect and whenever Home Assistant announces itself (its birth message
``online`` on ``<discovery_prefix>/status``). The entities read the topics the agent
publishes anyway: availability from the retained state (``online``), pipeline
figures from telemetry, the last result from the results topics, the active model
versions from the state. Nothing extra is published per frame.

A button publishes one fixed payload, but a command needs an id the device has not
seen (a repeated id is answered ``duplicate`` and not run). So the buttons publish
on ``<prefix>/<device>/ha/ping`` and ``<prefix>/<device>/ha/restart`` (payload: the
pipeline), and the agent turns each press into a command with a fresh id, handled
and answered (on the reply topic) like any other. Presses are QoS 0: a press made
while the device is away is not run hours later. With signed commands required
there are no buttons (Home Assistant cannot sign) and the ``ha`` topics are ignored.

Turning the integration off removes the device from Home Assistant: an empty
retained message on the topic an earlier run announced (kept in
``<state_dir>/home_assistant.json``), once, at the next connect.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Incoming, Link

log = logging.getLogger(__name__)

MARKER_FILE = "home_assistant.json"
MANUFACTURER = "edge-deploy"
ORIGIN_NAME = "edge-agent"
# Home Assistant's discovery topic matcher takes only these in the object id.
_NOT_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
ACTIONS = ("ping", "restart")
# A press is a pipeline name at most; anything longer is not from a discovered button.
MAX_PRESS_BYTES = 256
# A press waits at most this long in the command queue before it is refused as expired.
PRESS_EXPIRY_S = 60.0

Submit = Callable[[bytes], None]


def object_id(device: str) -> str:
    """The device id as Home Assistant accepts it in a discovery topic ('.' is not)."""
    return _NOT_OBJECT_ID.sub("_", device)


def slug(text: str) -> str:
    """Lower case letters, digits and '_': what an entity id may hold."""
    return _NOT_SLUG.sub("_", text.lower()).strip("_") or "x"


def discovery_topic(discovery_prefix: str, device: str) -> str:
    return f"{discovery_prefix}/device/{object_id(device)}/config"


def action_topic(topic_prefix: str, device: str, action: str) -> str:
    return f"{topic_prefix}/{p.validate_device_id(device)}/ha/{action}"


def buttons_offered(config: AgentConfig) -> bool:
    return config.integrations.home_assistant.buttons and not config.mqtt.require_signed_commands


# ---------------------------------------------------------------------- templates
# Only Jinja2's own syntax and filters, so they render the same in Home Assistant
# and in the tests. Pipeline and model names are SAFE_ID_RE words: no quotes.

AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"

RESULT_TEMPLATE = (
    "{%- set r = value_json -%}"
    "{%- if r.classes -%}{{ (r.classes[0].label | default(r.classes[0].index) | string)[:100] }}"
    "{%- elif r.detections is defined -%}{{ r.detections | length }} detected"
    "{%- elif r.segmentation is defined and r.segmentation.classes -%}"
    "{{ (r.segmentation.classes[0].label | default(r.segmentation.classes[0].index)"
    " | string)[:100] }}"
    "{%- elif r.keypoints is defined -%}{{ r.keypoints | length }} keypoints"
    "{%- else -%}{{ r.model }} {{ r.version }}"
    "{%- endif -%}"
)

RESULT_ATTRIBUTES_TEMPLATE = (
    "{%- set r = value_json -%}"
    "{{ {'score': r.classes[0].score if r.classes else "
    "((r.detections | map(attribute='score') | max) if r.detections else none), "
    "'count': (r.detections | length) if r.detections is defined else none, "
    "'model': r.model, 'version': r.version, 'latency_ms': r.latency_ms, "
    "'frame': r.frame, 'seq': r.seq} | tojson }}"
)


def _pipeline_value(pipeline: str, key: str) -> str:
    return f"{{{{ value_json.pipelines['{pipeline}'].{key} }}}}"


def _model_value(model: str) -> str:
    return (
        f"{{{{ ((value_json.models | selectattr('name', 'eq', '{model}') "
        "| map(attribute='active') | list) + [none]) | first }}"
    )


def _model_attributes(model: str) -> str:
    return (
        f"{{{{ ((value_json.models | selectattr('name', 'eq', '{model}') | list) + [{{}}]) "
        "| first | tojson }}"
    )


# ----------------------------------------------------------------------- payload


class _Ids:
    """Slugs for names, unique within the device even when two names slug alike
    (``front-door`` and ``front_door``)."""

    def __init__(self, device_slug: str) -> None:
        self.device_slug = device_slug
        self._used: set[str] = set()

    def name(self, kind: str, name: str) -> str:
        base = f"{kind}_{slug(name)}"
        key, n = base, 2
        while key in self._used:
            key, n = f"{base}_{n}", n + 1
        self._used.add(key)
        return key

    def component(self, platform: str, key: str, **fields: Any) -> dict[str, Any]:
        unique = f"edge_{self.device_slug}_{key}"
        return {"p": platform, "unique_id": unique, "default_entity_id": f"{platform}.{unique}"} | {
            k: v for k, v in fields.items() if v is not None
        }


def discovery_payload(config: AgentConfig, agent_version: str) -> dict[str, Any]:
    """The device-based discovery message for this config (a JSON object)."""
    ha = config.integrations.home_assistant
    device = config.device.id
    topics = p.Topics(config.mqtt.topic_prefix)
    ids = _Ids(slug(device))
    telemetry, state = topics.telemetry(device), topics.state(device)
    components: dict[str, dict[str, Any]] = {}
    offer_buttons = buttons_offered(config)
    for pipeline in config.pipelines:
        name, key = pipeline.name, ids.name("pipeline", pipeline.name)
        components.update(
            {
                f"{key}_fps": {
                    "name": f"{name} fps",
                    "state_topic": telemetry,
                    "value_template": _pipeline_value(name, "fps"),
                    "unit_of_measurement": "fps",
                    "state_class": "measurement",
                    "suggested_display_precision": 1,
                },
                f"{key}_invoke_p95": {
                    "name": f"{name} invoke p95",
                    "state_topic": telemetry,
                    "value_template": _pipeline_value(name, "invoke_ms_p95"),
                    "unit_of_measurement": "ms",
                    "device_class": "duration",
                    "state_class": "measurement",
                    "entity_category": "diagnostic",
                },
                f"{key}_dropped": {
                    "name": f"{name} dropped frames",
                    "state_topic": telemetry,
                    "value_template": _pipeline_value(name, "dropped"),
                    "state_class": "total_increasing",
                    "entity_category": "diagnostic",
                },
                f"{key}_result": {
                    "name": f"{name} last result",
                    "state_topic": topics.results(device, name),
                    "value_template": RESULT_TEMPLATE,
                    "json_attributes_topic": topics.results(device, name),
                    "json_attributes_template": RESULT_ATTRIBUTES_TEMPLATE,
                    "icon": "mdi:eye",
                },
            }
        )
        if offer_buttons:
            components[f"{key}_restart"] = {
                "platform_": "button",
                "name": f"{name} restart",
                "command_topic": action_topic(config.mqtt.topic_prefix, device, "restart"),
                "payload_press": name,
                "device_class": "restart",
                "entity_category": "config",
            }
    for model in dict.fromkeys(pc.model for pc in config.pipelines):
        components[f"{ids.name('model', model)}_version"] = {
            "name": f"{model} version",
            "state_topic": state,
            "value_template": _model_value(model),
            "json_attributes_topic": state,
            "json_attributes_template": _model_attributes(model),
            "icon": "mdi:brain",
        }
    if offer_buttons:
        components["ping"] = {
            "platform_": "button",
            "name": "ping",
            "command_topic": action_topic(config.mqtt.topic_prefix, device, "ping"),
            "entity_category": "diagnostic",
        }
    cmps = {}
    for key, fields in components.items():
        platform = fields.pop("platform_", "sensor")
        cmps[key] = ids.component(platform, key, **fields)
    return {
        "dev": {
            "ids": [f"edge-deploy_{device}"],
            "name": ha.name or device,
            "mf": MANUFACTURER,
            "mdl": "edge-agent",
            "sw": agent_version,
        },
        "o": {"name": ORIGIN_NAME, "sw": agent_version},
        "availability": [{"topic": state, "value_template": AVAILABILITY_TEMPLATE}],
        "cmps": cmps,
    }


# ----------------------------------------------------------------------- runtime


class HomeAssistantDiscovery:
    """Announces the device and turns button presses into commands.

    Everything it does on the network thread (connect listener, message handlers)
    only queues publishes or hands a command to ``submit``; the marker file is
    written and removed on the caller's thread (``start``, ``stop``).
    """

    def __init__(
        self,
        config: AgentConfig,
        link: Link,
        submit: Submit,
        agent_version: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._ha = config.integrations.home_assistant
        self._link = link
        self._submit = submit
        self._clock = clock
        self.device = config.device.id
        self.topic = discovery_topic(self._ha.discovery_prefix, self.device)
        self.payload = json.dumps(discovery_payload(config, agent_version)).encode()
        self._marker = config.state_dir / MARKER_FILE
        self._stale: list[str] = []  # topics an earlier run announced, to clear
        self._cleared: set[str] = set()
        self._lock = threading.Lock()
        self.announced = 0
        self.presses = 0
        self.ignored = 0

    @property
    def birth_topic(self) -> str:
        return f"{self._ha.discovery_prefix}/status"

    def start(self) -> None:
        earlier = _read_marker(self._marker)
        if self._ha.enabled:
            self._stale = [t for t in earlier if t != self.topic]
            _write_marker(self._marker, [self.topic, *self._stale])
            self._link.subscribe(self.birth_topic, self._on_birth, qos=1)
            if buttons_offered(self._config):
                topic = action_topic(self._config.mqtt.topic_prefix, self.device, "+")
                self._link.subscribe(topic, self._on_press, qos=0)
            elif self._ha.buttons:
                log.info("home assistant: no buttons, the device requires signed commands")
        else:
            self._stale = earlier
        if self._ha.enabled or self._stale:
            self._link.add_connect_listener(self._on_connect)

    def stop(self) -> None:
        """Forget the topics whose removal the broker acknowledged."""
        with self._lock:
            cleared = set(self._cleared)
        if not cleared:
            return
        left = [t for t in _read_marker(self._marker) if t not in cleared]
        if left:
            _write_marker(self._marker, left)
        else:
            self._marker.unlink(missing_ok=True)

    # ------------------------------------------------------------- network thread

    def _on_connect(self) -> None:
        for topic in self._stale:
            log.info("home assistant: removing the device announced on %s", topic)
            self._link.publish(topic, b"", qos=1, retain=True, on_ack=self._cleared_ack(topic))
        if self._ha.enabled:
            self.announce()

    def _cleared_ack(self, topic: str) -> Callable[[bool], None]:
        def acked(ok: bool) -> None:
            if ok:
                with self._lock:
                    self._cleared.add(topic)

        return acked

    def announce(self) -> bool:
        """Publish the discovery message (retained); False if it could not be queued."""
        queued = self._link.publish(self.topic, self.payload, qos=1, retain=True)
        if queued:
            self.announced += 1
        return queued

    def _on_birth(self, incoming: Incoming) -> None:
        # Home Assistant forgets nothing retained, but after its own restart it may
        # have missed an update; its birth message asks every device to announce again.
        if incoming.payload.strip() == b"online":
            self.announce()

    def _on_press(self, incoming: Incoming) -> None:
        action = incoming.topic.rsplit("/", 1)[-1]
        command = self._command(action, incoming.payload)
        if command is None:
            self.ignored += 1
            if self.ignored % 100 == 1:
                log.warning(
                    "home assistant: ignored %d press(es) so far (last on %s)",
                    self.ignored,
                    incoming.topic,
                )
            return
        self.presses += 1
        self._submit(json.dumps(command).encode())

    def _command(self, action: str, payload: bytes) -> dict[str, Any] | None:
        if action not in ACTIONS or len(payload) > MAX_PRESS_BYTES:
            return None
        now = self._clock()
        command: dict[str, Any] = {
            "id": f"ha-{action}-{uuid.uuid4().hex[:20]}",
            "op": action,
            "issued_at": now,
            "expires_at": now + PRESS_EXPIRY_S,
        }
        if action == "restart":
            try:
                pipeline = payload.decode("utf-8").strip()
            except UnicodeDecodeError:
                return None
            if pipeline not in {pc.name for pc in self._config.pipelines}:
                return None
            command["pipeline"] = pipeline
        return command


def _read_marker(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("home assistant: cannot read %s: %s", path, exc)
        return []
    topics = data.get("announced") if isinstance(data, dict) else None
    if not isinstance(topics, list):
        return []
    return [t for t in topics if isinstance(t, str) and t and "#" not in t and "+" not in t]


def _write_marker(path: Path, topics: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"announced": topics}), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        # Without it a later "enabled: false" cannot remove the device: say so, run on.
        log.warning("home assistant: cannot write %s: %s", path, exc)
