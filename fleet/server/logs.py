"""The server's logs on stdout: text for a terminal, or one JSON object per line.

JSON lines (``log_format: json``) are what journald, Loki or Elasticsearch ingest
without a parser of their own; every record keeps its logger name and level, and
the message is escaped by ``json.dumps``, so untrusted text cannot forge a line.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _EscapingFormatter(logging.Formatter):
    """Text lines with control characters escaped: one record, one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, sep, tail = text.partition("\nTraceback")
        head = head.encode("unicode_escape", "backslashreplace").decode("ascii")
        return head + (sep + tail.replace("\n", "\n    ") if sep else "")


def setup(fmt: Literal["text", "json"], level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _EscapingFormatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log is one line per request, devices' downloads included: keep
    # it at WARNING so the server's own records stay readable.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Alembic names each of its plugins at INFO on every start.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
