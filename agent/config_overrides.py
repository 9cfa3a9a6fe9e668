"""Live changes saved across restarts, and the config the agent runs with.

The file under /etc is read-only to the sandboxed service, so a ``config`` command's
changes are saved as dotted overrides in ``<state_dir>/config-overrides.json`` and
applied over the file at every start. ``load_effective_config`` is how both
``edge-agent run`` and ``edge-agent check`` read a config.

An override can stop applying when the file is edited (a pipeline renamed, a key no
longer live): the file wins. Such an override is dropped, key by key, and named in a
warning; it never stops the agent from starting, because a device that exits at
start-up (status 2, which systemd does not restart) is a dead device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError
from agent.config_changes import apply_changes, shown
from agent.config_loading import config_from_data, read_raw

logger = logging.getLogger(__name__)

OVERRIDES_FILE = "config-overrides.json"


@dataclass(frozen=True)
class EffectiveConfig:
    """The config to run with, and what of the saved overrides was kept or dropped."""

    config: AgentConfig
    overrides: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    unreadable: str | None = None  # why the overrides file was ignored as a whole

    @property
    def warnings(self) -> list[str]:
        """One line each, safe to log and to publish."""
        lines = [] if self.unreadable is None else [f"saved overrides ignored: {self.unreadable}"]
        for key, why in self.dropped.items():
            why = why.removeprefix(f"{shown(key)}: ")
            lines.append(f"saved override {shown(key)} dropped: {why}")
        return lines

    @property
    def needs_rewrite(self) -> bool:
        return bool(self.dropped) or self.unreadable is not None


def read_overrides(state_dir: Path) -> dict[str, Any]:
    """The saved overrides; raises ``ConfigError`` when the file cannot be used."""
    path = state_dir / OVERRIDES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: unreadable overrides: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: overrides must be a JSON object"])
    return data


def save_overrides(state_dir: Path, overrides: dict[str, Any]) -> None:
    """Written atomically: a crash leaves the old file or the new one, never half.

    Raises ``ConfigError`` (and leaves the old file) when the overrides cannot be
    written, so a caller changes nothing either.
    """
    try:
        text = json.dumps(overrides, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"overrides cannot be saved: {exc}"]) from None
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".overrides.", dir=state_dir)
    try:
        # json.dumps escapes every non-ASCII character, so this write cannot fail to encode.
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / OVERRIDES_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _keep_applicable(
    data: dict[str, Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The overrides that still apply to ``data`` together, and why each other one not.

    Tried one key at a time, repeated until nothing more is taken, so a pair that is
    only valid together (``publish.mode: rate`` with ``publish.max_per_s``) is kept
    whatever order the keys come in.
    """
    kept: dict[str, Any] = {}
    pending = dict(overrides)
    why: dict[str, str] = {}
    progress = True
    while pending and progress:
        progress = False
        for key, value in list(pending.items()):
            try:
                apply_changes(data, {**kept, key: value})
            except ConfigError as err:
                why[key] = "; ".join(err.problems)
                continue
            kept[key] = value
            del pending[key]
            why.pop(key, None)
            progress = True
    return kept, {k: why[k] for k in pending}


def load_effective_config(path: str | os.PathLike[str]) -> EffectiveConfig:
    """The config file with the saved overrides that still apply; never writes.

    Raises ``ConfigError`` only for the file itself: overrides that no longer apply
    (or an unreadable overrides file) are dropped and named in ``dropped``.
    """
    data = read_raw(path)
    config = config_from_data(data, path)
    try:
        overrides = read_overrides(config.state_dir)
    except ConfigError as err:
        return EffectiveConfig(config, unreadable="; ".join(err.problems))
    if not overrides:
        return EffectiveConfig(config)
    kept, dropped = _keep_applicable(data, overrides)
    if kept:
        config = config_from_data(apply_changes(data, kept), path)
    return EffectiveConfig(config, kept, dropped)
