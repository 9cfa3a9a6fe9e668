"""Home Assistant MQTT discovery: the payload against Home Assistant's documented schema,
its templates against a real agent's messages, and the buttons, birth message and
removal over a real broker with a real agent (converter-built digits model)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import __version__
from agent import protocol as p
from agent.config import AgentConfig, ConfigError, parse_config
from agent.live import LiveConfig
from agent.models.manifest import read_bundle
from agent.models.store import ModelStore
from agent.ops.homeassistant import MARKER_FILE, discovery_payload, discovery_topic
from agent.service import Agent
from tests.converter_support import build_digits_bundle
from tests.mqtt_support import Broker, MessageCollector, publish

# ------------------------------------------------------------------ schema facts
# Verified in Home Assistant core (homeassistant/components/mqtt: discovery.py,
# schemas.py, abbreviations.py, sensor.py, button.py) and the MQTT docs, as of 2026:
#
# - The discovery topic is <prefix>/<component>/[<node_id>/]<object_id>/config with
#   node_id and object_id in [a-zA-Z0-9_-]+ (TOPIC_MATCHER); device-based discovery
#   uses the component "device".
TOPIC_MATCHER = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
# - Abbreviations are expanded before validation: at the top level and in every
#   component (ABBREVIATIONS), in "device" (DEVICE_ABBREVIATIONS) and in "origin"
#   (ORIGIN_ABBREVIATIONS). These are the ones this payload may use.
ABBREVIATIONS = {
    "dev": "device",
    "o": "origin",
    "cmps": "components",
    "p": "platform",
    "avty": "availability",
    "t": "topic",
    "val_tpl": "value_template",
    "uniq_id": "unique_id",
    "def_ent_id": "default_entity_id",
    "stat_t": "state_topic",
    "cmd_t": "command_topic",
}
DEVICE_ABBREVIATIONS = {
    "ids": "identifiers",
    "mf": "manufacturer",
    "mdl": "model",
    "sw": "sw_version",
    "name": "name",
}
ORIGIN_ABBREVIATIONS = {"name": "name", "sw": "sw_version", "url": "support_url"}
# - DEVICE_DISCOVERY_SCHEMA (no extra keys): "device", "components" and "origin" are
#   required; besides them only the shared availability and topic options.
DEVICE_DISCOVERY_REQUIRED = {"device", "components", "origin"}
DEVICE_DISCOVERY_ALLOWED = DEVICE_DISCOVERY_REQUIRED | {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "state_topic",
    "command_topic",
    "message_expiry_interval",
    "qos",
    "encoding",
}
AVAILABILITY_ITEM_ALLOWED = {"topic", "payload_available", "payload_not_available",
                             "value_template"}  # fmt: skip
# - MQTT_ENTITY_DEVICE_INFO_SCHEMA: at least one of identifiers / connections.
DEVICE_ALLOWED = {
    "identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
    "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url",
}  # fmt: skip
# - MQTT_ORIGIN_INFO_SCHEMA: name required; sw_version and support_url optional.
ORIGIN_ALLOWED = {"name", "sw_version", "support_url"}
# - A component needs "platform" (one of SUPPORTED_COMPONENTS) and, for an entity
#   platform, "unique_id". default_entity_id ("<domain>.<slug>") replaces object_id,
#   deprecated since 2025.10 and no longer honoured from 2026.4.
COMMON_ENTITY_OPTIONS = {
    "platform", "unique_id", "default_entity_id", "name", "icon", "entity_category",
    "enabled_by_default", "availability", "availability_mode", "availability_topic",
    "availability_template", "json_attributes_topic", "json_attributes_template", "qos",
    "encoding", "entity_picture",
}  # fmt: skip
PLATFORM_OPTIONS = {
    # sensor.py: state_topic required (MQTT_RO_SCHEMA); a state longer than 255
    # characters is dropped; the payload "None" makes the state unknown.
    "sensor": {"state_topic", "value_template", "unit_of_measurement", "device_class",
               "state_class", "suggested_display_precision", "expire_after",
               "force_update"},
    # button.py: command_topic required; payload_press defaults to "PRESS".
    "button": {"command_topic", "command_template", "payload_press", "device_class",
               "retain"},
}  # fmt: skip
PLATFORM_REQUIRED = {"sensor": {"state_topic"}, "button": {"command_topic"}}
ENTITY_CATEGORIES = {"config", "diagnostic"}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}
DEFAULT_ENTITY_ID = re.compile(r"^(sensor|button)\.[a-z0-9_]+$")


def expand(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as Home Assistant reads it: every abbreviation written out."""

    def full(d: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
        return {table.get(k, k): v for k, v in d.items()}

    out = full(payload, ABBREVIATIONS)
    out["device"] = full(out["device"], DEVICE_ABBREVIATIONS)
    out["origin"] = full(out["origin"], ORIGIN_ABBREVIATIONS)
    out["availability"] = [full(a, ABBREVIATIONS) for a in out.get("availability", [])]
    out["components"] = {k: full(c, ABBREVIATIONS) for k, c in out["components"].items()}
    return out


def check_against_schema(topic: str, payload: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Every documented constraint above; returns the expanded payload."""
    assert topic.startswith(prefix + "/")
    match = TOPIC_MATCHER.fullmatch(topic[len(prefix) + 1 :])
    assert match is not None and match["component"] == "device", topic
    doc = expand(payload)
    assert DEVICE_DISCOVERY_REQUIRED <= doc.keys() <= DEVICE_DISCOVERY_ALLOWED, doc.keys()
    device, origin = doc["device"], doc["origin"]
    assert device.keys() <= DEVICE_ALLOWED and device["identifiers"]
    assert all(isinstance(i, str) for i in device["identifiers"])
    assert origin.keys() <= ORIGIN_ALLOWED and origin["name"]
    for item in doc["availability"]:
        assert item.keys() <= AVAILABILITY_ITEM_ALLOWED and item["topic"]
    unique_ids = [c["unique_id"] for c in doc["components"].values()]
    assert len(unique_ids) == len(set(unique_ids))
    for key, comp in doc["components"].items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", key), key
        platform = comp["platform"]
        assert platform in PLATFORM_OPTIONS, comp
        assert comp.keys() <= COMMON_ENTITY_OPTIONS | PLATFORM_OPTIONS[platform], (
            comp.keys() - COMMON_ENTITY_OPTIONS - PLATFORM_OPTIONS[platform]
        )
        assert PLATFORM_REQUIRED[platform] <= comp.keys()
        assert comp["unique_id"] and "object_id" not in comp
        assert DEFAULT_ENTITY_ID.fullmatch(comp["default_entity_id"])
        assert comp["default_entity_id"].startswith(f"{platform}.")
        assert comp.get("entity_category", "config") in ENTITY_CATEGORIES
        assert comp.get("state_class", "measurement") in SENSOR_STATE_CLASSES
    return doc


def templates(doc: dict[str, Any]) -> dict[str, str]:
    """Every template in the payload by '<component>.<option>'."""
    found = {f"availability.{i}": a["value_template"] for i, a in enumerate(doc["availability"])}
    for key, comp in doc["components"].items():
        for option in ("value_template", "json_attributes_template", "command_template"):
            if option in comp:
                found[f"{key}.{option}"] = comp[option]
    return found


def render(template: str, payload: bytes) -> str:
    """As Home Assistant renders a value template: ``value`` and ``value_json``, in a
    sandbox (only Jinja2's own filters are used, which Home Assistant also has)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    text = payload.decode()
    return env.from_string(template).render(value=text, value_json=json.loads(text))


def config_for(data: dict[str, Any]) -> AgentConfig:
    base = {"device": {"id": "pi.cam-1"}, "models": {"require_signature": False}}
    return parse_config(base | data)


PIPES = [
    {"name": "front-door", "model": "digits", "source": {"type": "synthetic"}},
    {"name": "front_door", "model": "digits", "source": {"type": "synthetic"}},
    {"name": "yard", "model": "ssd.v2", "source": {"type": "synthetic"}},
]


def test_payload_follows_home_assistants_schema() -> None:
    config = config_for(
        {"integrations": {"home_assistant": {"enabled": True, "name": "Porch"}}, "pipelines": PIPES}
    )
    topic = discovery_topic("homeassistant", config.device.id)
    assert topic == "homeassistant/device/pi_cam-1/config"  # '.' is not allowed there
    doc = check_against_schema(topic, discovery_payload(config, __version__), "homeassistant")
    assert doc["device"]["name"] == "Porch" and doc["device"]["sw_version"] == __version__
    assert doc["origin"] == {"name": "edge-agent", "sw_version": __version__}
    comps = doc["components"]
    # Two pipelines whose names slug alike still get an entity each.
    fps = sorted(k for k in comps if k.endswith("_fps"))
    assert fps == ["pipeline_front_door_2_fps", "pipeline_front_door_fps", "pipeline_yard_fps"]
    assert {c["platform"] for c in comps.values()} == {"sensor", "button"}
    buttons = {k: c for k, c in comps.items() if c["platform"] == "button"}
    assert sorted(c.get("payload_press", "PRESS") for c in buttons.values()) == [
        "PRESS", "front-door", "front_door", "yard",
    ]  # fmt: skip
    assert {c["command_topic"] for c in buttons.values()} == {
        "edge/pi.cam-1/ha/restart",
        "edge/pi.cam-1/ha/ping",
    }
    versions = [c for c in comps.values() if c["name"].endswith(" version")]
    assert sorted(c["name"] for c in versions) == ["digits version", "ssd.v2 version"]
    from jinja2 import Environment

    for where, text in templates(doc).items():
        assert Environment().parse(text) is not None, where  # every template compiles


def test_signed_commands_mean_no_buttons(tmp_path: Path) -> None:
    key = tmp_path / "cmd.pub"
    key.write_text("unused")
    config = config_for(
        {
            "mqtt": {"require_signed_commands": True, "command_keys": [str(key)]},
            "integrations": {"home_assistant": {"enabled": True}},
            "pipelines": PIPES[:1],
        }
    )
    doc = expand(discovery_payload(config, __version__))
    assert {c["platform"] for c in doc["components"].values()} == {"sensor"}


def test_discovery_prefix_is_checked() -> None:
    with pytest.raises(ConfigError, match="discovery_prefix"):
        config_for({"integrations": {"home_assistant": {"discovery_prefix": "ha/#"}}})


# ------------------------------------------------------------- real broker, agent


def write_config(path: Path, broker: Broker, state: Path, enabled: bool) -> Path:
    config = {
        "device": {"id": "pi-ha"},
        "state_dir": str(state),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "ha-test"},
        "models": {"require_signature": False},
        "telemetry": {"interval_s": 1},
        "integrations": {"home_assistant": {"enabled": enabled, "discovery_prefix": "hatest"}},
        "pipelines": [
            {"name": "cam", "model": "digits", "queue": "fifo",
             "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                        "channels": 1, "fps": 20}},
        ],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    bundle = read_bundle(build_digits_bundle(tmp_path / "bundle", "1"))
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(bundle.manifest_data, None, bundle.model_path)
    store.set_active("digits", "1")
    return tmp_path / "state"


@pytest.fixture
def ha(broker: Broker) -> Iterator[MessageCollector]:
    """What Home Assistant subscribes to: discovery, and the topics the entities read."""
    collector = MessageCollector(broker, ["hatest/device/+/config", "ha-test/pi-ha/#"])
    yield collector
    collector.close()


def replies_done(ha: MessageCollector, n: int) -> list[dict[str, Any]]:
    topic = "ha-test/pi-ha/reply"
    deadline = time.monotonic() + 20
    while True:
        done = [
            json.loads(m.payload)
            for m in ha.messages
            if m.topic == topic and json.loads(m.payload)["status"] in ("done", "failed")
        ]
        if len(done) >= n or time.monotonic() > deadline:
            return done
        ha.wait_for(len([m for m in ha.messages if m.topic == topic]) + 1, 20, topic)


def test_buttons_birth_and_removal_with_a_real_agent(
    broker: Broker, ha: MessageCollector, state: Path, tmp_path: Path
) -> None:
    topic = "hatest/device/pi-ha/config"
    agent = Agent(LiveConfig.load(write_config(tmp_path / "on.yaml", broker, state, True)))
    agent.start()
    main_loop = threading.Thread(target=agent.serve, daemon=True)  # telemetry
    main_loop.start()
    try:
        announced = ha.wait_for(1, 20, topic)[0]
        payload = json.loads(announced.payload)
        assert payload == discovery_payload(agent.config, __version__)
        doc = check_against_schema(topic, payload, "hatest")
        assert json.loads((state / MARKER_FILE).read_text()) == {"announced": [topic]}

        # Home Assistant's birth message: the device announces itself again.
        publish(broker, "hatest/status", b"online", qos=0)
        again = ha.wait_for(2, 20, topic)[1]
        assert again.payload == announced.payload

        # The buttons, as Home Assistant presses them: fixed payloads, fresh ids.
        comps = doc["components"]
        ping, restart = comps["ping"], comps["pipeline_cam_restart"]
        publish(broker, restart["command_topic"], b"no-such-pipeline", qos=0)
        for _ in range(2):
            publish(broker, ping["command_topic"], b"PRESS", qos=0)
        publish(broker, restart["command_topic"], restart["payload_press"].encode(), qos=0)
        done = replies_done(ha, 3)
        assert [(r["code"], r["status"]) for r in done] == [("ok", "done")] * 3, done
        ids = [r["id"] for r in done]
        assert len(set(ids)) == 3 and sorted(i.split("-")[1] for i in ids) == [
            "ping", "ping", "restart",
        ]  # fmt: skip
        assert [r["data"]["pong"] for r in done if "-ping-" in r["id"]] == [True, True]
        assert agent.home_assistant.ignored == 1  # the unknown pipeline: no command
        assert agent.home_assistant.presses == 3

        # The templates render from the agent's real messages as HA would render them.
        deadline = time.monotonic() + 30
        while agent.pipelines["cam"].results_out < 5 or not any(
            m.topic.endswith("/telemetry") and json.loads(m.payload)["pipelines"]["cam"]["fps"] > 0
            for m in ha.messages
        ):
            assert time.monotonic() < deadline, "no results, or no telemetry with fps"
            time.sleep(0.1)
        last = {m.topic: m.payload for m in ha.messages}  # the newest of each topic
        telemetry = next(
            m.payload
            for m in reversed(ha.messages)
            if m.topic.endswith("/telemetry")
            and json.loads(m.payload)["pipelines"]["cam"]["fps"] > 0
        )
        result = last["ha-test/pi-ha/results/cam"]
        state_msg = p.State.model_validate_json(last["ha-test/pi-ha/state"])
        on = render(doc["availability"][0]["value_template"], last["ha-test/pi-ha/state"])
        assert on == "online"
        fps = render(comps["pipeline_cam_fps"]["value_template"], telemetry)
        assert float(fps) > 0
        assert int(render(comps["pipeline_cam_dropped"]["value_template"], telemetry)) >= 0
        p95 = render(comps["pipeline_cam_invoke_p95"]["value_template"], telemetry)
        assert p95 == "None" or float(p95) > 0  # "None": unknown in HA
        parsed = p.Result.model_validate_json(result)
        assert parsed.classes, "digits is a classifier"
        top = parsed.classes[0]
        shown = render(comps["pipeline_cam_result"]["value_template"], result)
        assert shown == (top.label if top.label is not None else str(top.index))
        attrs = json.loads(render(comps["pipeline_cam_result"]["json_attributes_template"], result))
        assert attrs["score"] == top.score and attrs["version"] == "1"
        version = render(
            comps["model_digits_version"]["value_template"], last["ha-test/pi-ha/state"]
        )
        assert version == "1" == state_msg.models[0].active
        model_attrs = render(
            comps["model_digits_version"]["json_attributes_template"], last["ha-test/pi-ha/state"]
        )
        assert json.loads(model_attrs)["status"] == state_msg.models[0].status
        offline = p.State.model_validate_json(last["ha-test/pi-ha/state"]).model_copy(
            update={"online": False}
        )
        assert render(doc["availability"][0]["value_template"], offline.to_bytes()) == "offline"
    finally:
        agent.stop_event.set()
        main_loop.join(10)
        agent.stop()

    # Turned off: the next run removes the device from Home Assistant (an empty
    # retained config), and forgets the topic once the broker has it.
    seen = len([m for m in ha.messages if m.topic == topic])
    agent = Agent(LiveConfig.load(write_config(tmp_path / "off.yaml", broker, state, False)))
    agent.start()
    try:
        removal = ha.wait_for(seen + 1, 20, topic)[seen]
        assert removal.payload == b""
        publish(broker, "hatest/status", b"online", qos=0)
        publish(broker, "ha-test/pi-ha/ha/ping", b"PRESS", qos=0)  # not listened to
        publish(broker, "ha-test/pi-ha/cmd", json.dumps({"id": "after", "op": "ping"}).encode())
        done = replies_done(ha, 4)
        assert done[-1]["id"] == "after"
        assert len([m for m in ha.messages if m.topic == topic]) == seen + 1  # no announce
    finally:
        agent.stop()
    assert not (state / MARKER_FILE).exists()
    retained = MessageCollector(broker, [topic, "ha-test/pi-ha/state"])
    try:
        # The state is retained, the config no longer: only the state arrives.
        got = retained.wait_for(1, 10)
        assert [m.topic for m in got] == ["ha-test/pi-ha/state"]
    finally:
        retained.close()
