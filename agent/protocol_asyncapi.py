"""The machine-readable contract of the wire protocol, built from ``agent.protocol``:
an AsyncAPI 3.0 document and the JSON Schemas that ``edge-agent schema`` prints.

``scripts/protocol-contract.py`` writes both under docs/ (``asyncapi.yaml``,
``schemas/<Message>.json``) with the examples of docs/protocol.md, and
tests/test_asyncapi.py fails when the committed files differ from what this
module builds. The document describes the device (``edge-agent``): ``send`` is
what the device publishes, ``receive`` what it subscribes to; a console does the
opposite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent import protocol as p

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
REGENERATE = ".venv/bin/python scripts/protocol-contract.py"

# The same markers tests/test_docs.py reads: an example is the JSON block after
# ``<!-- example: Message -->``.
EXAMPLE_RE = re.compile(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", re.S)

# Topic words that stand for a channel parameter: Topics validates what it is
# given, so the builders run with these ids and the ids become ``{parameter}``.
_PLACEHOLDERS = {
    "prefix": "zz-prefix-zz",
    "device": "zz-device-zz",
    "group": "zz-group-zz",
    "pipeline": "zz-pipeline-zz",
    "transferId": "zz-transfer-zz",
    "console": "zz-console-zz",
}

_PARAMETERS = {
    "prefix": "mqtt.topic_prefix of the devices; it may hold several levels (acme/site-3)",
    "device": "a device id (letters, digits, '.', '_', '-'; not 'group' or 'transfer')",
    "group": "a group id the device is a member of (its config's groups)",
    "pipeline": "a pipeline name of the device's config",
    "transferId": "the artifact's transfer_id of a deploy with kind mqtt",
    "console": "any topic levels the console chooses (the filter is <prefix>/replies/#)",
}


@dataclass(frozen=True)
class _Channel:
    key: str
    topic: Callable[[p.Topics, Mapping[str, str]], str]
    messages: tuple[str, ...]
    action: Literal["send", "receive"]
    retain: bool
    description: str


def _command_messages() -> tuple[str, ...]:
    return tuple(f"{op}Command" for op in p.COMMAND_OPS)


def _response_topic(topics: p.Topics, ids: Mapping[str, str]) -> str:
    # The default response-topic filter besides the device's own reply topic.
    from agent.link.reply_routes import ReplyRoutes

    filters = ReplyRoutes(topics, ids["device"]).filters
    wide = [f for f in filters if f.endswith("/#")]
    return wide[0][: -len("#")] + ids["console"]


CHANNELS: tuple[_Channel, ...] = (
    _Channel(
        "commands",
        lambda t, i: t.cmd(i["device"]),
        _command_messages(),
        "receive",
        False,
        "Commands for one device. Every command gets replies (accepted, progress, done or "
        "failed) on the replies channel, or, with MQTT 5, on the command's response topic.",
    ),
    _Channel(
        "groupCommands",
        lambda t, i: t.group_cmd(i["group"]),
        _command_messages(),
        "receive",
        False,
        "A command for every member of a group; each member replies on its own.",
    ),
    _Channel(
        "replies",
        lambda t, i: t.reply(i["device"]),
        ("Reply",),
        "send",
        False,
        "Replies to commands, with the command's MQTT 5 correlation data when it had some.",
    ),
    _Channel(
        "responseTopics",
        _response_topic,
        ("Reply",),
        "send",
        False,
        "MQTT 5 only: replies to a command that named this response topic. A device "
        "answers on a response topic only when it matches mqtt.reply_topics (default: "
        "its own reply topic and <prefix>/replies/#) and is no topic of the protocol; "
        "otherwise on the replies channel.",
    ),
    _Channel(
        "state",
        lambda t, i: t.state(i["device"]),
        ("State",),
        "send",
        True,
        "The device's retained state, published on every connect and whenever it "
        "changes; the last will (retained) says online: false.",
    ),
    _Channel(
        "telemetry",
        lambda t, i: t.telemetry(i["device"]),
        ("Telemetry",),
        "send",
        False,
        "Periodic figures of the device and its pipelines, through the outbox (seq).",
    ),
    _Channel(
        "results",
        lambda t, i: t.results(i["device"], i["pipeline"]),
        ("Result",),
        "send",
        False,
        "Inference results of one pipeline, through the outbox (seq).",
    ),
    _Channel(
        "chunks",
        lambda t, i: t.transfer(i["transferId"]),
        ("Chunk",),
        "receive",
        False,
        "The model file of a deploy with artifact kind mqtt, in chunks the console "
        "publishes when a device asks for them.",
    ),
    _Channel(
        "chunkRequests",
        lambda t, i: t.transfer_missing(i["transferId"]),
        ("ChunkRequest",),
        "send",
        False,
        "A device's request for the chunks it still lacks (the first 1024 of them).",
    ),
)

# The Topics builders each channel stands for (the wildcard helpers and parse are
# for consoles); tests/test_asyncapi.py checks none is left out.
TOPIC_BUILDERS = frozenset(
    {"cmd", "group_cmd", "reply", "state", "telemetry", "results", "transfer", "transfer_missing"}
)


def _address(channel: _Channel) -> tuple[str, list[str]]:
    topic = channel.topic(p.Topics(_PLACEHOLDERS["prefix"]), _PLACEHOLDERS)
    names = [name for name, word in _PLACEHOLDERS.items() if word in topic]
    for name in names:
        topic = topic.replace(_PLACEHOLDERS[name], "{" + name + "}")
    return topic, names


# ------------------------------------------------------------------------ schemas


def _asyncapi_schema(node: Any) -> Any:
    """A pydantic (JSON Schema 2020-12) schema as an AsyncAPI Schema Object, whose
    base is draft 07: ``$defs`` move to components, ``prefixItems`` (tuples) is the
    array form of ``items``, and the OpenAPI-style discriminator object goes (the
    AsyncAPI one is a property name for inheritance; ``op`` is a const in each
    alternative, so ``oneOf`` alone is exact)."""
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$defs", "discriminator"):
            continue
        if key == "$ref":
            out[key] = value.replace("#/$defs/", "#/components/schemas/")
        elif key == "prefixItems":
            out["items"] = _asyncapi_schema(value)
        elif key in ("properties", "patternProperties"):
            # Property names are data, not keywords: a property called "$ref" or
            # "discriminator" must keep its name.
            out[key] = {name: _asyncapi_schema(sub) for name, sub in value.items()}
        else:
            out[key] = _asyncapi_schema(value)
    return out


def _component_schemas(schemas: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    components: dict[str, Any] = {}

    def add(name: str, schema: dict[str, Any]) -> None:
        converted = _asyncapi_schema(schema)
        if name in components and components[name] != converted:
            raise ValueError(f"two different schemas are both called {name!r}")
        components[name] = converted

    for name, schema in schemas.items():
        for def_name, definition in schema.get("$defs", {}).items():
            add(def_name, definition)
        add(name, schema)
    return dict(sorted(components.items()))


# ----------------------------------------------------------------------- examples


def doc_examples(markdown: str) -> dict[str, list[dict[str, Any]]]:
    """The examples of docs/protocol.md by message (commands by op, ``<op>Command``),
    each checked against the protocol first: an example that does not validate
    must not reach the contract."""
    found: dict[str, list[dict[str, Any]]] = {}
    for n, (name, body) in enumerate(EXAMPLE_RE.findall(markdown), 1):
        try:
            if name == "Command":
                key = f"{p.decode_command(body.encode()).op}Command"
            else:
                getattr(p, name).model_validate_json(body)
                key = name
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"example {n} ({name}) of docs/protocol.md: {exc}") from None
        found.setdefault(key, []).append(json.loads(body))
    return found


def _examples_for(name: str, given: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if name in given:
        return list(given[name])
    if name.endswith("Command"):
        # An op the page shows no example of and that needs nothing but its id.
        op = name[: -len("Command")]
        minimal: dict[str, Any] = {"id": f"{op}-1", "op": op}
        p.decode_command(json.dumps(minimal).encode())
        return [minimal]
    raise ValueError(f"docs/protocol.md has no example of {name}")


# ----------------------------------------------------------------------- document


def _message(name: str, schema_name: str, examples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{schema_name}"},
    }
    if name.endswith("Command"):
        message["summary"] = f"The {name[: -len('Command')]} command."
        message["bindings"] = {
            "mqtt": {
                "responseTopic": {
                    "type": "string",
                    "description": "MQTT 5: where the replies go, if mqtt.reply_topics "
                    "allows it (else the replies channel)",
                },
                "correlationData": {
                    "type": "string",
                    "description": "MQTT 5: opaque bytes; every reply carries them back",
                },
                "bindingVersion": MQTT_BINDING_VERSION,
            }
        }
    elif name == "Reply":
        message["bindings"] = {
            "mqtt": {
                "correlationData": {
                    "type": "string",
                    "description": "MQTT 5: the command's correlation data, unchanged",
                },
                "bindingVersion": MQTT_BINDING_VERSION,
            }
        }
    message["examples"] = [
        {"name": f"{name}-{n}", "payload": payload} for n, payload in enumerate(examples, 1)
    ]
    return message


def _server() -> dict[str, Any]:
    from agent.config import MqttConfig
    from agent.link.client import max_incoming_packet_bytes

    mqtt = MqttConfig()
    last_will = p.Topics(_PLACEHOLDERS["prefix"]).state(_PLACEHOLDERS["device"])
    for name in ("prefix", "device"):
        last_will = last_will.replace(_PLACEHOLDERS[name], "{" + name + "}")
    return {
        "host": "{host}:{port}",
        "protocol": "mqtt",
        "protocolVersion": mqtt.protocol,
        "description": "Any MQTT broker; devices speak MQTT 5 (mqtt.protocol: 5, the "
        "default) or 3.1.1. A device's client id is its device id; its session is "
        "persistent, so commands sent while it is offline reach it when it reconnects.",
        "variables": {
            "host": {"default": mqtt.host},
            "port": {"default": str(mqtt.port), "description": "usually 8883 with TLS"},
        },
        "bindings": {
            "mqtt": {
                "cleanSession": False,
                "keepAlive": mqtt.keepalive_s,
                "sessionExpiryInterval": mqtt.session_expiry_s,
                "maximumPacketSize": max_incoming_packet_bytes(),
                "lastWill": {
                    "topic": last_will,
                    "qos": 1,
                    "retain": True,
                    "message": "the device's State with online: false",
                },
                "bindingVersion": MQTT_BINDING_VERSION,
            }
        },
    }


def _operation_id(channel: _Channel) -> str:
    return channel.action + channel.key[0].upper() + channel.key[1:]


def asyncapi_document(examples: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the protocol; ``examples`` by message name as
    ``doc_examples`` returns them (an op without one gets its minimal command)."""
    schemas = p.json_schemas()
    command_schemas = {f"{op}Command": op.capitalize() + "Command" for op in p.COMMAND_OPS}
    message_schemas = {**command_schemas, **{n: n for n in schemas if n != "Command"}}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in CHANNELS:
        address, names = _address(channel)
        channels[channel.key] = {
            "address": address,
            "description": channel.description,
            "messages": {
                name: {"$ref": f"#/components/messages/{name}"} for name in channel.messages
            },
            "parameters": {name: {"$ref": f"#/components/parameters/{name}"} for name in names},
        }
        who = "The device publishes" if channel.action == "send" else "The device subscribes"
        operation: dict[str, Any] = {
            "action": channel.action,
            "channel": {"$ref": f"#/channels/{channel.key}"},
            "summary": f"{who} (QoS 1{', retained' if channel.retain else ''}).",
            "messages": [
                {"$ref": f"#/channels/{channel.key}/messages/{name}"} for name in channel.messages
            ],
            "bindings": {
                "mqtt": {"qos": 1, "retain": channel.retain, "bindingVersion": MQTT_BINDING_VERSION}
            },
        }
        if channel.key in ("commands", "groupCommands"):
            operation["reply"] = {
                "channel": {"$ref": "#/channels/replies"},
                "messages": [{"$ref": "#/channels/replies/messages/Reply"}],
            }
        operations[_operation_id(channel)] = operation
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "edge-deploy device protocol",
            "version": str(p.PROTOCOL_VERSION),
            "description": "The MQTT protocol between edge-agent devices and fleet consoles "
            "(docs/protocol.md). Operations are the device's: send is what a device "
            "publishes, receive what it subscribes to. Payloads are UTF-8 JSON; keys whose "
            f"value is null are left out. Generated from agent/protocol.py by `{REGENERATE}`.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"broker": _server()},
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {
                name: _message(name, schema, _examples_for(name, examples))
                for name, schema in message_schemas.items()
            },
            "schemas": _component_schemas(schemas),
            "parameters": {
                name: {"description": description} for name, description in _PARAMETERS.items()
            },
        },
    }


# -------------------------------------------------------------------------- files


def schema_files() -> dict[str, str]:
    """``schemas/<Message>.json``: each message's schema as ``edge-agent schema``
    prints it (2-space indent, sorted keys)."""
    return {
        f"schemas/{name}.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in p.json_schemas().items()
    }


def contract_files(protocol_md: str) -> dict[str, str]:
    """Every generated file, by path under docs/, from the text of docs/protocol.md."""
    import yaml

    document = asyncapi_document(doc_examples(protocol_md))
    header = (
        "# Generated from agent/protocol.py and the examples of docs/protocol.md: do not\n"
        f"# edit. Regenerate with `{REGENERATE}`.\n"
    )
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return {"asyncapi.yaml": header + text, **schema_files()}
