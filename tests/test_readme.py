"""Every command the README shows parses with the real command-line parsers, every make
target it names exists, and every extra it installs is defined: the README cannot
drift from the code. (What the commands do is exercised by the converter, fleet,
config and end-to-end tests and by `make demo`.)"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (make test-pythons): the same parser, as a package
    import tomli as tomllib

from agent.cli import build_parser as agent_parser
from converter.cli import build_parser as convert_parser
from fleet.cli import build_parser as fleet_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


LINES = shell_lines()
PARSERS = {"edge-agent": agent_parser, "edge-convert": convert_parser, "edge-fleet": fleet_parser}


def test_readme_shows_all_three_tools_and_the_two_make_commands() -> None:
    tools = {line.split()[0] for line in LINES}
    assert {"edge-agent", "edge-convert", "edge-fleet", "make"} <= tools
    assert "make demo" in LINES and "make test" in LINES


@pytest.mark.parametrize("line", [ln for ln in LINES if ln.split()[0] in PARSERS])
def test_command_parses(line: str) -> None:
    argv = shlex.split(line)
    PARSERS[argv[0]]().parse_args(argv[1:])


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = {line.split()[1] for line in LINES if line.startswith("make ")}
    named |= set(re.findall(r"`make ([a-z-]+)`", README))
    assert named <= targets, named - targets


def test_pip_extras_exist() -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for line in LINES:
        if line.startswith("pip install"):
            for spec in re.findall(r"edge-deploy\[([a-z,]+)\]", line):
                assert set(spec.split(",")) <= extras, line


def test_every_constraints_file_has_its_install_row() -> None:
    files = {f"constraints/{p.name}" for p in (ROOT / "constraints").glob("*.txt")}
    named = {c for line in LINES for c in re.findall(r"-c (constraints/\S+)", line)}
    named |= set(re.findall(r"pip install -c (constraints/\S+)", README))
    assert files == named, (files, named)
    assert "constraints.txt" not in re.sub(r"constraints/[a-z0-9-]+\.txt", "", README)
