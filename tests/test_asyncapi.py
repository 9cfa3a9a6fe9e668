"""The machine-readable contract: docs/asyncapi.yaml and docs/schemas/ are what
agent/protocol.py generates (scripts/protocol-contract.py), `edge-agent schema` prints
the committed schemas, and the AsyncAPI document passes the official AsyncAPI parser
(tools/asyncapi, installed by `make setup`) with every example matching its payload."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import protocol as p
from agent.protocol_asyncapi import (
    CHANNELS,
    EXAMPLE_RE,
    REGENERATE,
    TOPIC_BUILDERS,
    contract_files,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOOL = ROOT / "tools/asyncapi"
SCRIPT = ROOT / "scripts/protocol-contract.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )


def _differences(expected: dict[str, str], folder: Path) -> list[str]:
    problems = []
    for path, text in expected.items():
        target = folder / path
        committed = target.read_text(encoding="utf-8") if target.is_file() else ""
        if committed != text:
            diff = difflib.unified_diff(
                committed.splitlines(), text.splitlines(), f"{path} (committed)",
                f"{path} (generated)", lineterm="", n=1,
            )  # fmt: skip
            problems.append("\n".join(list(diff)[:30]))
    for schema in sorted((folder / "schemas").glob("*.json")):
        if f"schemas/{schema.name}" not in expected:
            problems.append(f"schemas/{schema.name}: no message of agent/protocol.py")
    return problems


def test_committed_contract_is_what_the_code_generates() -> None:
    expected = contract_files((DOCS / "protocol.md").read_text(encoding="utf-8"))
    problems = _differences(expected, DOCS)
    assert not problems, f"docs/ is stale; regenerate with: {REGENERATE}\n" + "\n".join(problems)


def test_committed_schemas_are_what_edge_agent_schema_prints() -> None:
    done = _run(sys.executable, "-m", "agent", "schema")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    committed = {f.stem: json.loads(f.read_text()) for f in (DOCS / "schemas").glob("*.json")}
    assert committed == printed


def test_the_script_writes_the_files_and_check_names_a_stale_one(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DOCS / "protocol.md", docs / "protocol.md")
    (docs / "schemas").mkdir()
    (docs / "schemas/Gone.json").write_text("{}\n")
    assert _run(sys.executable, SCRIPT, "--check", "--docs", docs).returncode == 1

    written = _run(sys.executable, SCRIPT, "--docs", docs)
    assert written.returncode == 0, written.stderr
    assert not (docs / "schemas/Gone.json").exists()
    assert _run(sys.executable, SCRIPT, "--check", "--docs", docs).returncode == 0
    assert (docs / "asyncapi.yaml").read_text() == (DOCS / "asyncapi.yaml").read_text()

    chunk = docs / "schemas/Chunk.json"
    chunk.write_text(chunk.read_text().replace('"index"', '"position"'))
    stale = _run(sys.executable, SCRIPT, "--check", "--docs", docs)
    assert stale.returncode == 1
    assert "schemas/Chunk.json" in stale.stderr
    assert REGENERATE in stale.stderr


def test_an_example_that_does_not_validate_stops_the_generator() -> None:
    page = (DOCS / "protocol.md").read_text(encoding="utf-8")
    bad = '{"transfer_id": "t-1", "index": -1, "total": 1, "data": ""}'
    broken = page + f"\n<!-- example: Chunk -->\n```json\n{bad}\n```\n"
    with pytest.raises(ValueError, match=r"(?s)example \d+ \(Chunk\) of docs/protocol.md:.*index"):
        contract_files(broken)


def _document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    return document


def test_every_topic_of_the_protocol_has_a_channel() -> None:
    builders = {
        name
        for name in vars(p.Topics)
        if not name.startswith("_") and not name.startswith("all_") and name != "parse"
    }
    assert builders == TOPIC_BUILDERS
    # Each address, its parameters filled in, is the topic the code builds.
    ids = {
        "prefix": "acme/site-3", "device": "pi-1", "group": "hall", "pipeline": "door-cam",
        "transferId": "t-1", "console": "console-7",
    }  # fmt: skip
    channels = _document()["channels"]
    assert set(channels) == {c.key for c in CHANNELS}
    for channel in CHANNELS:
        address = channels[channel.key]["address"]
        assert address.format(**ids) == channel.topic(p.Topics(ids["prefix"]), ids)
    assert channels["commands"]["address"].format(**ids) == p.Topics("acme/site-3").cmd("pi-1")


def test_every_message_op_and_binding_is_in_the_document() -> None:
    document = _document()
    messages = document["components"]["messages"]
    wanted = {f"{op}Command" for op in p.COMMAND_OPS} | (set(p.json_schemas()) - {"Command"})
    assert set(messages) == wanted
    page_examples = EXAMPLE_RE.findall((DOCS / "protocol.md").read_text())
    in_document = [e["payload"] for m in messages.values() for e in m["examples"]]
    for _name, body in page_examples:
        assert json.loads(body) in in_document
    operations = document["operations"]
    retained = {key for key, op in operations.items() if op["bindings"]["mqtt"]["retain"]}
    assert retained == {"sendState"}
    assert {op["bindings"]["mqtt"]["qos"] for op in operations.values()} == {1}
    receive = {op["channel"]["$ref"] for op in operations.values() if op["action"] == "receive"}
    assert receive == {"#/channels/commands", "#/channels/groupCommands", "#/channels/chunks"}
    will = document["servers"]["broker"]["bindings"]["mqtt"]["lastWill"]
    assert (will["topic"], will["retain"]) == (document["channels"]["state"]["address"], True)
    assert "$defs" not in json.dumps(document)


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not (TOOL / "node_modules/@asyncapi/parser").is_dir():
        pytest.fail(
            "the AsyncAPI parser is not installed: run make setup (scripts/ensure-asyncapi.sh)"
        )
    return _run(node, TOOL / "validate.mjs", path)


def test_the_asyncapi_parser_accepts_the_document() -> None:
    done = _validate(DOCS / "asyncapi.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid: AsyncAPI 3.0.0" in done.stdout


def _break_a_reference(document: dict[str, Any]) -> str:
    document["operations"]["sendState"]["channel"] = {"$ref": "#/channels/nowhere"}
    return "'#/channels/nowhere' does not exist"


def _break_an_example(document: dict[str, Any]) -> str:
    document["components"]["messages"]["Chunk"]["examples"][0]["payload"]["index"] = "first"
    return "example Chunk-1 of Chunk: data/index must be integer"


@pytest.mark.parametrize("damage", [_break_a_reference, _break_an_example])
def test_the_asyncapi_check_refuses_a_broken_document(tmp_path: Path, damage: Any) -> None:
    document = _document()
    expected = damage(document)
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(yaml.safe_dump(document, sort_keys=False))
    done = _validate(broken)
    assert done.returncode == 1, done.stdout
    assert expected in done.stdout
