"""The running config: live changes from ``config`` commands and SIGHUP reloads.

Live changes are saved as dotted overrides in the state directory
(``agent.config_overrides``) and applied over the file at every start. A reload
re-reads the file: live keys take effect at once; anything else is named as needing
a restart and keeps its old value until then. Both go through
``agent.config_changes``, so a value is checked by the schema whichever way it comes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError
from agent.config_changes import changed_keys, is_live_key, take_live, with_changes
from agent.config_overrides import EffectiveConfig, load_effective_config, save_overrides

logger = logging.getLogger(__name__)

Listener = Callable[[AgentConfig], None]
# State carries the warnings; a device that is reloaded often keeps only the newest.
MAX_WARNINGS = 20


class LiveConfig:
    """Owns the running config; others read ``current`` and subscribe to changes."""

    def __init__(self, path: Path, config: AgentConfig, overrides: dict[str, Any] | None = None):
        self.path = path
        self.current = config
        self._overrides = dict(overrides or {})
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.restart_needed: list[str] = []
        self.warnings: list[str] = []
        self._unannounced: list[str] = []

    @classmethod
    def load(cls, path: Path, *, announce: bool = True) -> LiveConfig:
        """The config as ``edge-agent run`` starts with it; stale overrides are dropped.

        ``announce=False`` holds the warnings back until ``announce()``: the service
        sets logging up from the config it loads, so it can only log them after that.
        """
        effective = load_effective_config(path)
        live = cls(path, effective.config, effective.overrides)
        live._settle(effective)
        if announce:
            live.announce()
        return live

    def announce(self) -> None:
        """Log the warnings not logged yet, one line each."""
        for line in self._unannounced:
            logger.warning("%s", line)
        self._unannounced = []

    def _settle(self, effective: EffectiveConfig) -> None:
        """Note what of the saved overrides was dropped, and save the ones kept."""
        if not effective.needs_rewrite:
            return
        self._unannounced += effective.warnings
        self.warnings = (self.warnings + effective.warnings)[-MAX_WARNINGS:]
        try:
            save_overrides(effective.config.state_dir, effective.overrides)
        except (OSError, ConfigError) as exc:
            # Not fatal: the same overrides are dropped again at the next start.
            logger.error("could not rewrite the saved overrides: %s", exc)

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
        """Apply and save live changes; raises ``ConfigError`` and changes nothing.

        The changes go onto the running config, not the file: an edit of the file
        waits for a reload (SIGHUP) or a restart, as it would without this command.
        """
        with self._lock:
            config = with_changes(self.current, changes)
            overrides = {**self._overrides, **changes}
            try:
                save_overrides(config.state_dir, overrides)
            except OSError as exc:
                raise ConfigError([f"cannot save the change: {exc.strerror or exc}"]) from None
            self._overrides = overrides
            self._publish(config)
        logger.info("config changed live: %s", ", ".join(sorted(changes)))
        return {"applied": changes}

    def reload(self) -> dict[str, Any]:
        """Re-read the file (SIGHUP): live keys change, the rest waits for a restart."""
        with self._lock:
            try:
                effective = load_effective_config(self.path)
            except ConfigError as err:
                logger.error("reload refused, config unchanged: %s", "; ".join(err.problems))
                return {"error": err.problems}
            new = effective.config
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
                try:
                    new = take_live(self.current, new, live)
                except ConfigError as err:
                    logger.error("reload refused, config unchanged: %s", "; ".join(err.problems))
                    return {"error": err.problems}
                logger.warning("config reload: needs a restart to change: %s", ", ".join(restart))
            self._overrides = dict(effective.overrides)
            self._settle(effective)
            self.announce()
            self.restart_needed = restart
            if live:
                logger.info("config reload: changed live: %s", ", ".join(live))
                self._publish(new)
        return {"changed": live, "restart_needed": restart}
