"""Log output: one line per record on stdout, which journald stores as it is.

``text`` lines are ``LEVEL logger: message`` (journald adds the time and the unit);
``json`` lines carry the same fields plus the time, for log shippers. One record is
one line whatever its text: messages carry untrusted text (command ids, config keys,
URLs), so the text format escapes control characters (a newline in a config key
cannot forge a second record) and lone surrogates (which cannot be written as
UTF-8); a traceback's lines are indented, so none of them reads as a record. The level comes
from the config's ``log_level`` unless ``EDGE_AGENT_LOG_LEVEL`` is set: the
environment wins, so an operator can turn on DEBUG with a drop-in
(``Environment=EDGE_AGENT_LOG_LEVEL=DEBUG``) without editing the config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

LEVEL_ENV = "EDGE_AGENT_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


# C0 and C1 controls, DEL, the Unicode line and paragraph separators (str.splitlines
# breaks on them) and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Those that json.dumps(ensure_ascii=False) leaves as they are.
_UNSAFE_IN_JSON = re.compile("[\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def escape_control(text: str) -> str:
    """``text`` on one line, printable and encodable: ``\\n``, ``\\x1b``, ``\\ud800`` ..."""
    return _UNSAFE.sub(_escape, text)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, one physical line per record plus indented tracebacks."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # A copy: other handlers (and the record's own exc_text cache) see the original.
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape_control(record.getMessage()), None
        safe.name = escape_control(record.name)
        safe.exc_text = None
        return super().format(safe)

    def formatException(self, ei: Any) -> str:
        return self._indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indented(super().formatStack(stack_info))

    @staticmethod
    def _indented(text: str) -> str:
        # Exception messages are untrusted too: each of their lines gets the indent.
        return "\n".join(f"  {escape_control(line)}" for line in text.split("\n"))


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
        # json.dumps escapes newlines and controls; what it leaves could still end a line
        # for some readers or not encode at all. Inside JSON strings \uXXXX is the same text.
        line = json.dumps(entry, ensure_ascii=False, default=str)
        return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


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
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
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
