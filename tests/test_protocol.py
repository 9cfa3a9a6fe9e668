from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agent import protocol as p


def test_topics_under_default_prefix() -> None:
    t = p.Topics()
    assert t.cmd("pi-1") == "edge/pi-1/cmd"
    assert t.group_cmd("lab") == "edge/group/lab/cmd"
    assert t.reply("pi-1") == "edge/pi-1/reply"
    assert t.state("pi-1") == "edge/pi-1/state"
    assert t.telemetry("pi-1") == "edge/pi-1/telemetry"
    assert t.results("pi-1", "cam0") == "edge/pi-1/results/cam0"
    assert t.all_states() == "edge/+/state"


def test_topics_under_nested_prefix_parse_back() -> None:
    t = p.Topics("acme/site-3")
    assert t.parse(t.results("pi-1", "cam0")) == ("pi-1", "results", "cam0")
    assert t.parse(t.state("pi-1")) == ("pi-1", "state", None)
    with pytest.raises(p.ProtocolError):
        t.parse("other/pi-1/state")
    with pytest.raises(p.ProtocolError):
        t.parse("acme/site-3/group/lab/cmd")


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "a#", "x" * 65, "-lead", "sp ace", "group", "transfer", "ü"]
)
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        p.Topics().state(bad)


@given(st.text(max_size=80))
def test_accepted_device_ids_never_hold_mqtt_wildcards(value: str) -> None:
    try:
        p.validate_device_id(value)
    except ValueError:
        return
    assert value and len(value) <= p.MAX_ID_LENGTH
    assert not set(value) & {"/", "+", "#", "\0"}


def test_decode_round_trips_every_command() -> None:
    commands = [
        p.PingCommand(id="c1"),
        p.StatusCommand(id="c2", expires_at=2e9),
        p.RollbackCommand(id="c3", model="digits", to_version="1.0.0"),
        p.ConfigCommand(id="c4", changes={"telemetry.interval_s": 5}),
        p.RestartCommand(id="c5", pipeline="cam0"),
        p.DeployCommand(
            id="c6",
            manifest={"name": "digits", "version": "2"},
            artifact=p.UrlArtifact(url="http://10.0.0.1:8000/model.tflite"),
        ),
        p.DeployCommand(
            id="c7",
            manifest={"name": "digits"},
            artifact=p.MqttArtifact(transfer_id="t1", chunk_size=65536, chunks=3),
            signature="c2ln",
        ),
    ]
    for cmd in commands:
        assert p.decode_command(cmd.to_bytes()) == cmd


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (b"{not json", p.ReplyCode.BAD_JSON, "not valid JSON"),
        (b"\xff\xfe", p.ReplyCode.BAD_JSON, "not valid JSON"),
        (b"[1, 2]", p.ReplyCode.SCHEMA, "JSON object"),
        (b'{"id": "x", "op": "reboot"}', p.ReplyCode.UNKNOWN_OP, "reboot"),
        (b'{"id": "x"}', p.ReplyCode.UNKNOWN_OP, "None"),
        (b'{"id": "x", "op": "rollback"}', p.ReplyCode.SCHEMA, "model: required key missing"),
        (b'{"id": "x", "op": "ping", "extra": 1}', p.ReplyCode.SCHEMA, "extra: unknown key"),
        (b'{"id": "a/b", "op": "ping"}', p.ReplyCode.SCHEMA, "id:"),
        (
            b'{"id": "x", "op": "deploy", "manifest": {}, "artifact": {"kind": "http", '
            b'"url": "ftp://192.0.2.1/m"}}',
            p.ReplyCode.SCHEMA,
            "artifact.url",
        ),
    ],
)
def test_bad_commands_get_a_code_and_a_reason(
    payload: bytes, code: p.ReplyCode, words: str
) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_command(payload)
    assert info.value.code is code
    assert words in info.value.message


def test_oversized_command_is_refused_before_parsing() -> None:
    payload = json.dumps({"id": "x", "op": "ping", "pad": "a" * p.MAX_COMMAND_BYTES}).encode()
    with pytest.raises(p.ProtocolError) as info:
        p.decode_command(payload)
    assert info.value.code is p.ReplyCode.TOO_LARGE


@given(st.binary(max_size=512))
def test_decode_never_raises_anything_but_protocol_error(payload: bytes) -> None:
    try:
        p.decode_command(payload)
    except p.ProtocolError:
        pass


def test_command_id_of_recovers_ids_for_failure_replies() -> None:
    assert p.command_id_of(b'{"id": "abc", "op": "nope"}') == "abc"
    assert p.command_id_of(b'{"id": "a/b"}') == ""
    assert p.command_id_of(b"garbage") == ""


def test_messages_forbid_unknown_keys_and_encode_without_nulls() -> None:
    state = p.State(device="pi-1", online=True, agent_version="0.1.0", since=1.0, ts=2.0)
    data = json.loads(state.to_bytes())
    assert data["protocol"] == p.PROTOCOL_VERSION
    assert "runtime" not in data
    with pytest.raises(ValidationError):
        p.State.model_validate({**data, "bogus": 1})


def test_json_schemas_cover_every_message() -> None:
    schemas = p.json_schemas()
    assert set(schemas) == {
        "Command", "Reply", "State", "Telemetry", "Result", "Chunk", "ChunkRequest",
    }  # fmt: skip
    ops = {
        m["properties"]["op"]["const"]
        for m in schemas["Command"]["$defs"].values()
        if "op" in m.get("properties", {})
    }
    assert ops == set(p.COMMAND_OPS)
