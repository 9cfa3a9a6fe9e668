"""The running config: live changes from ``config`` commands and SIGHUP reloads.

Live changes are persisted as dotted overrides in the state directory (the config
file under /etc is read-only to the sandboxed service) and applied over the file at
every start. A reload re-reads the file: live keys take effect at once; anything
else is named as needing a restart and keeps its old value until then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import (
    AgentConfig,
    ConfigError,
    apply_changes,
    config_from_data,
    is_live_key,
    load_effective_config,
    load_overrides,
    read_raw,
    save_overrides,
)

logger = logging.getLogger(__name__)

Listener = Callable[[AgentConfig], None]


def flatten(config: AgentConfig) -> dict[str, Any]:
    """Dotted leaf paths of a config; pipelines keyed by name, not position."""
    data = config.model_dump(mode="json")
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
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class LiveConfig:
    """Owns the running config; others read ``current`` and subscribe to changes."""

    def __init__(self, path: Path, config: AgentConfig) -> None:
        self.path = path
        self.current = config
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.restart_needed: list[str] = []

    @classmethod
    def load(cls, path: Path) -> LiveConfig:
        return cls(path, load_effective_config(path))

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _publish(self, config: AgentConfig) -> None:
        self.current = config
        for listener in self._listeners:
            try:
                listener(config)
            except Exception:
                logger.exception("applying a config change failed in %r", listener)

    def apply(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply and persist live changes; raises ``ConfigError`` and changes nothing."""
        with self._lock:
            state_dir = self.current.state_dir
            overrides = {**load_overrides(state_dir), **changes}
            data = apply_changes(read_raw(self.path), overrides)
            config = config_from_data(data, self.path)
            save_overrides(state_dir, overrides)
            self._publish(config)
        logger.info("config changed live: %s", ", ".join(sorted(changes)))
        return {"applied": changes}

    def reload(self) -> dict[str, Any]:
        """Re-read the file (SIGHUP): live keys change, the rest waits for a restart."""
        with self._lock:
            try:
                new = load_effective_config(self.path)
            except ConfigError as err:
                logger.error("reload refused, config unchanged: %s", "; ".join(err.problems))
                return {"error": err.problems}
            changed = changed_keys(self.current, new)
            both = {p.name for p in self.current.pipelines} & {p.name for p in new.pipelines}
            live = [
                k
                for k in changed
                if is_live_key(k) and (not k.startswith("pipelines.") or k.split(".")[1] in both)
            ]
            restart = [k for k in changed if k not in live]
            if restart:
                # Keep the old values for these: take only the live ones from the file.
                new = _merge_live(self.current, new, live)
                logger.warning("config reload: needs a restart to change: %s", ", ".join(restart))
            self.restart_needed = restart
            if live:
                logger.info("config reload: changed live: %s", ", ".join(live))
                self._publish(new)
        return {"changed": live, "restart_needed": restart}


def _merge_live(old: AgentConfig, new: AgentConfig, live: list[str]) -> AgentConfig:
    """``old`` with the ``live`` keys taken from ``new``."""
    merged = old.model_copy(deep=True)
    for key in live:
        parts = key.split(".")
        src: Any = new
        dst: Any = merged
        if parts[0] == "pipelines":
            src = next(p for p in new.pipelines if p.name == parts[1])
            dst = next(p for p in merged.pipelines if p.name == parts[1])
            parts = parts[2:]
        for part in parts[:-1]:
            src, dst = getattr(src, part), getattr(dst, part)
        setattr(dst, parts[-1], getattr(src, parts[-1]))
    return merged
