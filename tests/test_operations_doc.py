"""docs/operations.md must not drift from what it describes."""

from __future__ import annotations

import re
from pathlib import Path

from agent.cli import build_parser
from agent.config_changes import LIVE_KEYS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs/operations.md").read_text()
INSTALL = (ROOT / "systemd/install.sh").read_text()
UNIT = (ROOT / "systemd/edge-agent.service").read_text()


def test_live_keys_listed_are_the_config_live_keys() -> None:
    block = DOC.split("<!-- live-keys -->")[1].split("<!-- /live-keys -->")[0]
    assert re.findall(r"`([^`]+)`", block) == list(LIVE_KEYS)


def test_every_install_option_in_the_doc_exists_and_every_option_is_documented() -> None:
    accepted = set(re.findall(r"^\s+(?:-\w\|)?(--[a-z-]+)\)", INSTALL, re.M))
    mentioned = set(re.findall(r"`(--[a-z-]+)", DOC))
    mentioned |= set(re.findall(r"install\.sh (--[a-z-]+)", DOC))
    assert mentioned - {"--offline", "--timeout"} <= accepted
    assert accepted - {"--help", "--constraints"} <= mentioned


def test_check_options_in_the_doc_exist() -> None:
    check = build_parser()._subparsers._group_actions[0].choices["check"]  # type: ignore[union-attr]
    options = {opt for action in check._actions for opt in action.option_strings}
    assert {"--offline", "--timeout"} <= options


def test_unit_settings_quoted_in_the_doc_are_in_the_unit() -> None:
    # Unit settings are CamelCase; READY=1 and friends are notify messages.
    for setting in re.findall(r"`([A-Z][a-z][A-Za-z]*=[^`]*)`", DOC):
        key, _, value = setting.partition("=")
        if key in ("Environment", "DeviceAllow") or value.endswith("..."):
            continue  # examples of drop-ins, not the unit's own lines
        if value:
            assert f"{key}={value}" in UNIT, setting
        else:
            assert f"{key}=" in UNIT, setting
