"""docs/protocol.md must not drift from agent/protocol.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import protocol as p

DOC = (Path(__file__).resolve().parent.parent / "docs/protocol.md").read_text()
EXAMPLES = re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", DOC, re.S)


def test_doc_has_an_example_of_every_message() -> None:
    assert {name for name, _ in EXAMPLES} == set(p.json_schemas())


@pytest.mark.parametrize(("name", "body"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_doc_examples_validate(name: str, body: str) -> None:
    if name == "Command":
        p.decode_command(body.encode())
    else:
        getattr(p, name).model_validate_json(body)


def test_doc_lists_every_reply_code_and_op() -> None:
    for code in p.ReplyCode:
        assert f"`{code.value}`" in DOC
    for op in p.COMMAND_OPS:
        assert f"`{op}`" in DOC
