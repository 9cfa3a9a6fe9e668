"""What every decoder of hostile bytes must keep, whatever the bytes.

Shared by the property tests (tests/test_fuzz_properties.py, hypothesis, part of
``make test``) and the coverage-guided targets (tests/fuzz/run.py, atheris,
``make fuzz``). A check raises only ``AssertionError`` for a broken rule; any
other exception escaping it is a finding too.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import yaml

from agent import protocol as p
from agent.config import ConfigError, parse_config
from agent.models.manifest import ManifestError, parse_manifest

# Codes a payload may be refused with before any work is done.
DECODE_CODES = {p.ReplyCode.BAD_JSON, p.ReplyCode.SCHEMA, p.ReplyCode.TOO_LARGE}
MAX_CONFIG_BYTES = 64 * 1024


def check_command(data: bytes) -> None:
    command_id = p.command_id_of(data)
    assert command_id == "" or p.SAFE_ID_RE.match(command_id), command_id
    try:
        command = p.decode_command(data)
    except p.ProtocolError as err:
        assert err.code in DECODE_CODES | {p.ReplyCode.UNKNOWN_OP}, err.code
        assert isinstance(err.message, str) and err.message
        return
    # A command that decodes has an id the failure path would have found too.
    assert command_id == command.id, (command_id, command.id)
    assert command.op in p.COMMAND_OPS


def check_chunk(data: bytes) -> None:
    try:
        chunk = p.decode_message(data, p.Chunk, p.max_chunk_message_bytes())
    except p.ProtocolError as err:
        assert err.code in DECODE_CODES, err.code
        return
    assert chunk.index >= 0 and chunk.total > 0
    assert p.SAFE_ID_RE.match(chunk.transfer_id)


def check_chunk_request(data: bytes) -> None:
    try:
        request = p.decode_message(data, p.ChunkRequest, p.MAX_COMMAND_BYTES)
    except p.ProtocolError as err:
        assert err.code in DECODE_CODES, err.code
        return
    assert len(request.missing) <= p.MAX_MISSING_LISTED
    assert all(i >= 0 for i in request.missing)


def check_manifest(data: bytes) -> None:
    # A manifest reaches the device inside a command, so it passed the same guards.
    if len(data) > p.MAX_COMMAND_BYTES or p.json_depth_exceeds(data):
        return
    try:
        value = json.loads(data)
    except ValueError:
        return
    if not isinstance(value, dict):
        value = {"manifest": value}
    try:
        manifest = parse_manifest(value)
    except ManifestError as err:
        assert str(err)
        return
    assert p.SAFE_ID_RE.match(manifest.name) and p.SAFE_ID_RE.match(manifest.version)


def check_config(data: bytes) -> None:
    if len(data) > MAX_CONFIG_BYTES or p.json_depth_exceeds(data):
        return
    try:
        value = yaml.safe_load(data)
    except yaml.YAMLError:
        return
    except (ValueError, OverflowError, TypeError, RecursionError):
        # PyYAML's own constructors (timestamps, ...) raise these; not the agent's
        # parser. load_config is expected to report them as ConfigError.
        return
    try:
        parse_config(value)
    except ConfigError as err:
        assert err.problems and all(isinstance(line, str) for line in err.problems)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "command": check_command,
    "chunk": check_chunk,
    "chunk_request": check_chunk_request,
    "manifest": check_manifest,
    "config": check_config,
}


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs to start from: mutations of these reach deep into each parser."""
    tensor = {"name": "x", "shape": [1, 28, 28, 1], "dtype": "int8", "scale": 0.5, "zero_point": -1}
    manifest = {
        "format": 1, "name": "digits", "version": "2", "created_at": "2026-11-22T00:00:00Z",
        "task": "classify", "quantization": "int8",
        "model": {"file": "model.tflite", "sha256": "0" * 64, "size": 1000},
        "inputs": [tensor], "outputs": [{**tensor, "shape": [1, 10]}],
        "labels": [str(i) for i in range(10)],
        "preprocess": {"mean": [0.0], "std": [255.0], "color": "gray", "layout": "NHWC"},
        "producer": {"converter": "fuzz"},
    }  # fmt: skip
    commands = [
        {"id": "p1", "op": "ping"},
        {"id": "s1", "op": "status", "expires_at": 1e12},
        {"id": "r1", "op": "rollback", "model": "digits", "to_version": "1"},
        {"id": "c1", "op": "config", "changes": {"telemetry.interval_s": 5}},
        {"id": "x1", "op": "restart", "pipeline": "cam"},
        {
            "id": "d1",
            "op": "deploy",
            "manifest": manifest,
            "artifact": {"kind": "mqtt", "transfer_id": "t1", "chunk_size": 4096, "chunks": 3},
        },
        {"id": "d2", "op": "deploy", "manifest": manifest,
         "artifact": {"kind": "url", "url": "https://example.com/m.tflite"}},
        {"id": "a1", "op": "ping",
         "auth": {"target": "device/pi-1", "ts": 1.0, "nonce": "12345678", "signature": "AA=="}},
    ]  # fmt: skip
    chunk = p.Chunk(transfer_id="t1", index=1, total=3, data="QUJDRA==", sha256="a" * 64)
    request = p.ChunkRequest(transfer_id="t1", device="pi-1", missing=[0, 2, 5], ts=1.0)
    config = (
        "device: {id: pi-1, groups: [kitchen]}\n"
        "state_dir: /tmp/edge-fuzz-state\n"
        "mqtt: {host: localhost, port: 1883, reply_topics: ['edge/replies/#']}\n"
        "models: {require_signature: false}\n"
        "telemetry: {interval_s: 10}\n"
        "pipelines:\n"
        "  - name: cam\n"
        "    model: digits\n"
        "    source: {type: synthetic, kind: digits, width: 28, height: 28, fps: 5}\n"
    )
    return {
        "command": [json.dumps(c).encode() for c in commands],
        "chunk": [chunk.to_bytes()],
        "chunk_request": [request.to_bytes()],
        "manifest": [json.dumps(manifest).encode()],
        "config": [config.encode()],
    }
