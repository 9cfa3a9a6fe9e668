from __future__ import annotations

import base64
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


# ------------------------------------------------------------- hostile shapes (issue 14)

DEEP = [b"[" * 2000, b"{" * 2000, b'{"id": "deep", "op": "ping", "x": ' + b"[" * 5000]


@pytest.mark.parametrize("payload", DEEP, ids=["lists", "braces", "inside-a-command"])
def test_deep_nesting_is_refused_before_json_parses_it(payload: bytes) -> None:
    # On the old code json.loads raised RecursionError, which is not a ProtocolError.
    with pytest.raises(p.ProtocolError) as info:
        p.decode_command(payload)
    assert info.value.code is p.ReplyCode.SCHEMA
    assert "nested deeper" in info.value.message


@pytest.mark.parametrize("payload", DEEP, ids=["lists", "braces", "inside-a-command"])
def test_command_id_of_never_raises_on_deep_nesting(payload: bytes) -> None:
    assert p.command_id_of(payload) == ""


def test_depth_scan_ignores_brackets_inside_strings() -> None:
    brackets = "[" * 100 + '\\"' + "{" * 100
    payload = json.dumps({"id": "s1", "op": "ping", "pad": brackets}).encode()
    assert not p.json_depth_exceeds(payload)
    assert p.json_depth_exceeds(b'["\\\\"' + b"[" * 40)  # an escaped backslash ends nothing
    with pytest.raises(p.ProtocolError) as info:
        p.decode_command(payload)
    assert info.value.code is p.ReplyCode.SCHEMA and "pad" in info.value.message


def test_nesting_up_to_the_limit_is_parsed() -> None:
    value: object = 1
    for _ in range(p.MAX_JSON_DEPTH - 2):
        value = [value]
    payload = json.dumps({"id": "c1", "op": "config", "changes": {"a": value}}).encode()
    assert isinstance(p.decode_command(payload), p.ConfigCommand)


def test_command_id_of_refuses_long_or_oversized_ids() -> None:
    assert p.command_id_of(json.dumps({"id": "a" * (p.MAX_ID_LENGTH + 1)}).encode()) == ""
    big = json.dumps({"id": "ok1", "pad": "x" * p.MAX_COMMAND_BYTES}).encode()
    assert p.command_id_of(big) == ""


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[" * 3000, p.ReplyCode.SCHEMA),
        (b"{not json", p.ReplyCode.BAD_JSON),
        (b'{"transfer_id": "t1"}', p.ReplyCode.SCHEMA),
        (b"x" * 5000, p.ReplyCode.TOO_LARGE),
    ],
)
def test_decode_message_guards_chunks(payload: bytes, code: p.ReplyCode) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_message(payload, p.Chunk, max_bytes=4096)
    assert info.value.code is code


def test_decode_message_parses_a_chunk_and_a_chunk_request() -> None:
    chunk = p.Chunk(transfer_id="t1", index=0, total=2, data="QUJD")
    assert p.decode_message(chunk.to_bytes(), p.Chunk, 4096) == chunk
    request = p.ChunkRequest(transfer_id="t1", device="pi-1", missing=[1, 2], ts=1.0)
    assert p.decode_message(request.to_bytes(), p.ChunkRequest, 4096) == request


def test_largest_chunk_message_fits_its_bound() -> None:
    size = p.MAX_COMMAND_BYTES
    data = base64.b64encode(b"\xff" * size).decode()
    chunk = p.Chunk(
        transfer_id="t" * p.MAX_ID_LENGTH, index=10**9, total=10**9, data=data, sha256="0" * 64
    )
    assert len(chunk.to_bytes()) <= p.max_chunk_message_bytes(size)
