"""Dotted-path changes to a config: what may change live, and the one way to apply it.

A key is a dotted path into the config with pipelines addressed by name, not by
position: ``pipelines.door-cam.threshold``. The ``config`` command, the overrides
saved across restarts and a SIGHUP reload all change a config through
``apply_changes``, on plain data (the file's YAML, or a running config's dump), and
validate the result with the schema, so a value is bounded the same way wherever it
comes from.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from agent.config import AgentConfig, ConfigError, parse_config

# What the `config` command and a SIGHUP may change without a restart.
LIVE_KEYS = (
    "log_level",
    "telemetry.interval_s",
    "pipelines.*.threshold",
    "pipelines.*.top_k",
    "pipelines.*.publish.mode",
    "pipelines.*.publish.max_per_s",
    "pipelines.*.publish.score_delta",
    "pipelines.*.drift.enabled",
    "pipelines.*.drift.window",
    "pipelines.*.drift.min_frames",
    "pipelines.*.drift.threshold",
)

# A key comes from the network: in messages it is shown escaped, so a newline, a
# control character or a lone surrogate cannot forge a log line or break an encoder.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHOWN_MAX = 200
_PROBLEMS_MAX = 5


def shown(key: str) -> str:
    """``key`` as it may appear in a message: printable, valid UTF-8, bounded."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), key)
    return text if len(text) <= _SHOWN_MAX else f"{text[:_SHOWN_MAX]}..."


def is_live_key(key: str) -> bool:
    """Whether a dotted key (pipelines by name) may change without a restart."""
    parts = key.split(".")
    for pattern in LIVE_KEYS:
        want = pattern.split(".")
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts, strict=True)):
            return True
    return False


def _set(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Set ``key`` in ``data`` (in place); the problem, if it cannot be set."""
    if not isinstance(key, str) or not is_live_key(key):
        return (
            f"{shown(str(key))}: cannot change live (live keys: {', '.join(LIVE_KEYS)}); "
            "edit the config file and restart"
        )
    parts = key.split(".")
    node: Any = data
    if parts[0] == "pipelines":
        pipelines = data.get("pipelines")
        match = [
            p
            for p in (pipelines if isinstance(pipelines, list) else [])
            if isinstance(p, dict) and p.get("name") == parts[1]
        ]
        if not match:
            return f"{shown(key)}: no pipeline named '{shown(parts[1])}'"
        node, parts = match[0], parts[2:]
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{shown(key)}: {part} is not a mapping in the config"
        node = child
    node[parts[-1]] = value
    return None


def apply_changes(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of raw config ``data`` with dotted ``changes`` applied; only live keys.

    Raises ``ConfigError`` naming every key that is unknown or needs a restart, and
    every value the resulting config rejects (by key path, pipelines by name). The
    input is never modified.
    """
    new = copy.deepcopy(data)
    problems = [p for p in (_set(new, k, v) for k, v in changes.items()) if p is not None]
    if len(problems) > _PROBLEMS_MAX:
        # A reply names a few: a command of 10,000 bad keys must not get a reply of MBs.
        more = len(problems) - _PROBLEMS_MAX
        problems = [*problems[:_PROBLEMS_MAX], f"... and {more} more key(s) refused"]
    if problems:
        raise ConfigError(problems)
    parse_config(new)  # its problems name pipelines by name, as the keys do
    return new


def config_data(config: AgentConfig) -> dict[str, Any]:
    """A running config as plain data that ``parse_config`` turns back into it."""
    return config.model_dump(mode="json")


def flatten(config: AgentConfig) -> dict[str, Any]:
    """Dotted leaf paths of a config; pipelines keyed by name, not position."""
    data = config_data(config)
    data["pipelines"] = {p["name"]: p for p in data.get("pipelines", [])}
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", data)
    return flat


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def with_changes(config: AgentConfig, changes: dict[str, Any]) -> AgentConfig:
    """A running ``config`` with live ``changes`` applied; raises ``ConfigError``.

    The config's paths are already absolute, so its dump validates as it is.
    """
    return parse_config(apply_changes(config_data(config), changes))


def take_live(old: AgentConfig, new: AgentConfig, keys: list[str]) -> AgentConfig:
    """``old`` with the live ``keys`` taken from ``new`` (a reload that needs a restart)."""
    values = flatten(new)
    return with_changes(old, {k: values[k] for k in keys})
