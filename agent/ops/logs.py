"""Log output: one line per record on stdout, which journald stores as it is.

``text`` lines are ``LEVEL logger: message`` (journald adds the time and the unit);
``json`` lines carry the same fields plus the time, for log shippers. The level comes
from the config's ``log_level`` unless ``EDGE_AGENT_LOG_LEVEL`` is set: the
environment wins, so an operator can turn on DEBUG with a drop-in
(``Environment=EDGE_AGENT_LOG_LEVEL=DEBUG``) without editing the config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

LEVEL_ENV = "EDGE_AGENT_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc, thread if useful)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.threadName and record.threadName != "MainThread":
            entry["thread"] = record.threadName
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def effective_level(config_level: str, environ: Mapping[str, str] | None = None) -> str:
    """The level to log at: ``EDGE_AGENT_LOG_LEVEL`` when set and valid, else the config's."""
    env = os.environ if environ is None else environ
    wanted = env.get(LEVEL_ENV, "").strip().upper()
    return wanted if wanted in LEVELS else config_level


def setup_logging(
    level: str,
    log_format: LogFormat = "text",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Send every log record to ``stream`` (stdout); returns the level in force."""
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    chosen = effective_level(level, env)
    raw = env.get(LEVEL_ENV, "").strip()
    if raw and raw.upper() not in LEVELS:
        # Said even when the level in force is ERROR: the operator asked for something.
        root.setLevel(logging.WARNING)
        logger.warning(
            "%s=%r is not one of %s; using log_level %s", LEVEL_ENV, raw, ", ".join(LEVELS), level
        )
    root.setLevel(chosen)
    return chosen
