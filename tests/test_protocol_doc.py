"""docs/protocol.md must describe everything the code can send, and its signing example
must be true (tests/test_docs.py checks that every example validates)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from agent import protocol as p
from agent.models.manifest import (
    canonical_bytes,
    load_private_key,
    load_public_key,
    parse_manifest,
    sign_manifest,
    verify_signature,
)
from fleet.console import BrokerOptions, Console, InvalidEvent, StateEvent

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs/protocol.md").read_text(encoding="utf-8")
KEYS = ROOT / "docs/examples/keys"
EXAMPLES = re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", DOC, re.S)
# The file the deploy examples describe: 2100 bytes, byte i being i % 256.
EXAMPLE_MODEL = bytes(i % 256 for i in range(2100))


def section(title: str, level: int = 2) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    marks = "#" * level
    match = re.search(
        rf"^{marks} {re.escape(title)}\n(.*?)(?=^#{{1,{level}}} |\Z)", DOC, re.S | re.M
    )
    assert match, f"no section {marks} {title}"
    return match.group(1)


def table_first_cells(text: str) -> list[str]:
    """The backquoted words of each table row's first cell."""
    cells = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells += re.findall(r"`([^`]+)`", line.split("|")[1])
    return cells


def block(name: str) -> str:
    match = re.search(rf"<!-- signing: {name} -->\s*```\w*\n(.*?)```", DOC, re.S)
    assert match, f"no signing block {name}"
    return match.group(1)


def nested_models(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += nested_models(arg)
    return found


def field_tree(model: type[BaseModel]) -> dict[str, set[str]]:
    """Every field name of ``model`` and the models inside it, by model name."""
    tree: dict[str, set[str]] = {}
    todo = [model]
    while todo:
        current = todo.pop()
        if current.__name__ in tree:
            continue
        tree[current.__name__] = set(current.model_fields)
        for info in current.model_fields.values():
            todo += nested_models(info.annotation)
    return tree


def example_keys(value: object, keys: set[str] | None = None) -> set[str]:
    keys = set() if keys is None else keys
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            example_keys(item, keys)
    elif isinstance(value, list):
        for item in value:
            example_keys(item, keys)
    return keys


# ------------------------------------------------------------------ completeness


def test_reply_code_table_has_every_code_once() -> None:
    codes = table_first_cells(section("Reply codes", 3))
    assert sorted(codes) == sorted(code.value for code in p.ReplyCode)


def test_ops_table_has_every_op() -> None:
    table = re.search(r"^\| op \|.*?\n\n", section("Commands"), re.S | re.M)
    assert table
    assert set(table_first_cells(table.group(0))) == set(p.COMMAND_OPS)


def test_stage_table_has_every_stage_and_says_which_carry_percent() -> None:
    rows = [line for line in section("Stages", 3).splitlines() if line.startswith("| `")]
    stages = [re.findall(r"`([^`]+)`", row.split("|")[1])[0] for row in rows]
    assert stages == list(p.STAGES)
    with_percent = [s for s, row in zip(stages, rows, strict=True) if "absent" not in row]
    assert with_percent == list(p.STAGES_WITH_PERCENT)


def test_stages_reported_by_the_agent_are_the_listed_ones() -> None:
    # mypy checks the type at every call; this catches a report that bypasses it.
    reported = set()
    for path in (ROOT / "agent").rglob("*.py"):
        reported |= set(re.findall(r"progress\(\s*\"(\w+)\"", path.read_text()))
    assert reported, "no progress reports found: the pattern is stale"
    assert reported <= set(p.STAGES)


COMMAND_MODELS: list[type[BaseModel]] = [
    p.DeployCommand,
    p.RollbackCommand,
    p.StatusCommand,
    p.PingCommand,
    p.ConfigCommand,
    p.RestartCommand,
    p.Chunk,
    p.ChunkRequest,
]


@pytest.mark.parametrize(
    ("title", "models"),
    [
        ("Commands", COMMAND_MODELS),
        ("Replies", [p.Reply]),
        ("State", [p.State]),
        ("Telemetry", [p.Telemetry]),
        ("Results", [p.Result]),
    ],
)
def test_every_field_is_named_in_its_section(title: str, models: list[type[BaseModel]]) -> None:
    text = section(title)
    missing = {
        f"{name}.{field}"
        for model in models
        for name, fields in field_tree(model).items()
        for field in fields
        # `name?` in the ops table (optional), `name[]` for lists in the State table.
        if not any(f"`{field}{tail}`" in text for tail in ("", "?", "[]"))
    }
    assert not missing, f"## {title} does not name: {sorted(missing)}"


@pytest.mark.parametrize("name", ["Reply", "State", "Telemetry", "Result", "Chunk", "ChunkRequest"])
def test_examples_show_every_field(name: str) -> None:
    shown: set[str] = set()
    for example, body in EXAMPLES:
        if example == name:
            example_keys(json.loads(body), shown)
    fields = set().union(*field_tree(getattr(p, name)).values())
    assert fields - shown == set(), f"no {name} example shows {sorted(fields - shown)}"


def test_a_deploy_reply_keeps_nulls_in_data_and_drops_its_own() -> None:
    reply = p.Reply(
        id="dep-1", device="pi-1", status="done", code=p.ReplyCode.OK, ts=1.0,
        data={"previous": None},
    )  # fmt: skip
    sent = json.loads(reply.to_bytes())
    assert "stage" not in sent and "percent" not in sent
    assert sent["data"] == {"previous": None}


# ---------------------------------------------------------------- signing example


def deploy_examples() -> list[dict[str, typing.Any]]:
    commands = [json.loads(body) for name, body in EXAMPLES if name == "Command"]
    return [c for c in commands if c["op"] == "deploy"]


def test_signing_example_canonical_bytes_are_the_codes() -> None:
    manifest = json.loads(block("manifest"))
    parse_manifest(manifest)
    canonical = block("canonical").rstrip("\n").encode()
    assert canonical_bytes(manifest) == canonical
    assert f"({len(canonical)} bytes" in DOC
    assert hashlib.sha256(canonical).hexdigest() in DOC
    # The bundle writer's own layout, so the block is what manifest.json holds.
    assert (
        block("manifest")
        == json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )


def test_signing_example_signature_verifies_and_is_reproduced() -> None:
    manifest = json.loads(block("manifest"))
    signature = block("signature").strip()
    assert block("private key") == (KEYS / "test-ed25519.pem").read_text()
    assert block("public key") == (KEYS / "test-ed25519.pub.pem").read_text()
    public = load_public_key(KEYS / "test-ed25519.pub.pem")
    verify_signature(manifest, signature, [public])
    assert sign_manifest(manifest, load_private_key(KEYS / "test-ed25519.pem")) == signature
    # Re-serialised without its nulls, the same manifest no longer verifies.
    stripped = {k: v for k, v in manifest.items() if v is not None}
    with pytest.raises(Exception, match="does not verify"):
        verify_signature(stripped, signature, [public])


def test_signing_example_openssl_commands_give_the_same_signature(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(block("manifest"), encoding="utf-8")
    for key in KEYS.glob("test-ed25519*.pem"):
        (tmp_path / key.name).write_bytes(key.read_bytes())
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block("openssl")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Signature Verified Successfully" in run.stdout
    assert (tmp_path / "canonical.bin").read_bytes() == block("canonical").rstrip("\n").encode()
    assert (tmp_path / "manifest.sig").read_text().strip() == block("signature").strip()


def test_deploy_examples_carry_the_signed_example_manifest() -> None:
    manifest = json.loads(block("manifest"))
    signed, unsigned = deploy_examples()[:2]
    assert signed["manifest"] == manifest
    assert signed["signature"] == block("signature").strip()
    assert unsigned["manifest"] == manifest and "signature" not in unsigned
    assert manifest["model"]["size"] == len(EXAMPLE_MODEL)
    assert manifest["model"]["sha256"] == hashlib.sha256(EXAMPLE_MODEL).hexdigest()


def test_chunk_example_is_a_chunk_of_the_example_transfer() -> None:
    artifact = deploy_examples()[1]["artifact"]
    (chunk,) = [json.loads(body) for name, body in EXAMPLES if name == "Chunk"]
    size, chunk_size = len(EXAMPLE_MODEL), artifact["chunk_size"]
    assert artifact["chunks"] == -(-size // chunk_size) == chunk["total"]
    assert chunk["transfer_id"] == artifact["transfer_id"]
    start = chunk["index"] * chunk_size
    data = base64.b64decode(chunk["data"], validate=True)
    assert data == EXAMPLE_MODEL[start : start + chunk_size]
    assert chunk["sha256"] == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- versioning


NEWER_STATE = {
    "protocol": 1, "device": "pi-1", "online": True, "agent_version": "9.0", "since": 1.0,
    "ts": 2.0, "new_top": {"x": 1},
    "models": [{"name": "digits", "status": "serving", "new_in_model": True}],
    "pipelines": [{"name": "door", "status": "running", "new_in_pipeline": [1]}],
}  # fmt: skip


def test_read_message_leaves_out_unknown_keys_at_any_depth() -> None:
    payload = json.dumps(NEWER_STATE).encode()
    with pytest.raises(ValidationError):
        p.State.model_validate_json(payload)
    state = p.read_message(payload, p.State)
    assert state.models[0].name == "digits" and state.pipelines[0].name == "door"
    stages = {"invoke": {"p50": 1.0, "p999": 2}}
    telemetry = {"device": "pi-1", "seq": 1, "ts": 1.0, "uptime_s": 1.0, "gpu_percent": 5,
                 "pipelines": {"door": {"fps": 2.0, "stages": stages}}}  # fmt: skip
    read = p.decode_message(json.dumps(telemetry).encode(), p.Telemetry, 4096, from_device=True)
    assert read.pipelines["door"].stages["invoke"].p50 == 1.0


def test_read_message_still_checks_known_keys() -> None:
    bad = {**NEWER_STATE, "online": "maybe"}
    with pytest.raises(ValidationError, match="online"):
        p.read_message(json.dumps(bad).encode(), p.State)
    with pytest.raises(p.ProtocolError):
        p.decode_message(json.dumps(bad).encode(), p.State, 4096, from_device=True)


def test_commands_stay_strict() -> None:
    command = {"id": "ping-1", "op": "ping", "new_field": 1}
    with pytest.raises(p.ProtocolError) as err:
        p.decode_command(json.dumps(command).encode())
    assert err.value.code is p.ReplyCode.SCHEMA


def test_fleet_console_reads_a_newer_device(caplog: pytest.LogCaptureFixture) -> None:
    console = Console(BrokerOptions())
    newer = {**NEWER_STATE, "protocol": p.PROTOCOL_VERSION + 1}
    parse = typing.cast(types.MethodType, console._parse)
    event = parse("edge/pi-1/state", "pi-1", "state", json.dumps(newer).encode(), 3.0)
    assert isinstance(event, StateEvent) and event.state.protocol == p.PROTOCOL_VERSION + 1
    assert "speaks protocol 2" in caplog.text
    parse("edge/pi-1/state", "pi-1", "state", json.dumps(newer).encode(), 4.0)
    assert caplog.text.count("speaks protocol") == 1
    other = parse("edge/pi-2/state", "pi-2", "state", json.dumps(NEWER_STATE).encode(), 5.0)
    assert isinstance(other, InvalidEvent)
