"""The command record: which command ids the device has seen, how each ended, where
its replies go, and the nonces of signed commands.

It is what keeps a command delivered again (QoS 1 after a reconnect, or after a
restart) from running twice, and what lets the device answer, after a crash, the
commands that were running (``unfinished``). One SQLite file in the state dir.

Every failure of the file (disk full, a closed record, text SQLite cannot encode)
is a ``RecordError``: the dispatcher still sends its reply when recording fails.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol as p

RECENT_IDS_KEPT = 2000


class RecordError(Exception):
    """The record could not be read or written; the message says why."""


@dataclass(frozen=True)
class Route:
    """Where the replies to one command go."""

    topic: str
    correlation_data: bytes | None


@dataclass(frozen=True)
class Unfinished:
    """A command recorded as accepted that never got its final reply."""

    command_id: str
    op: str
    route: Route | None
    stage: str | None = None  # the last progress stage reported before the restart


_COLUMNS_ADDED = (
    ("op", "TEXT"),
    ("reply_topic", "TEXT"),
    ("correlation", "BLOB"),
    ("stage", "TEXT"),
)


class CommandRecord:
    """Recent command ids and their outcome, persisted across restarts."""

    def __init__(self, path: Path, keep: int = RECENT_IDS_KEPT) -> None:
        self.path = path
        self._keep = keep
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS recent (id TEXT PRIMARY KEY, status TEXT NOT NULL, "
            "code TEXT NOT NULL, message TEXT NOT NULL, data TEXT, ts REAL NOT NULL)"
        )
        # Records written before routes were kept lack these columns.
        present = {row[1] for row in db.execute("PRAGMA table_info(recent)")}
        for name, kind in _COLUMNS_ADDED:
            if name not in present:
                db.execute(f"ALTER TABLE recent ADD COLUMN {name} {kind}")
        db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL)")
        with self._lock:
            self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._db is None:
                raise RecordError("the command record is closed")
            try:
                return self._db.execute(sql, args).fetchall()
            except (sqlite3.Error, UnicodeError, ValueError, OverflowError) as exc:
                raise RecordError(f"{type(exc).__name__}: {exc}") from exc

    def get(self, command_id: str) -> dict[str, Any] | None:
        rows = self._run(
            "SELECT status, code, message, data FROM recent WHERE id = ?", (command_id,)
        )
        if not rows:
            return None
        status, code, message, data = rows[0]
        original: dict[str, Any] = {"status": status, "code": code, "message": message}
        if data is not None:
            try:
                original["data"] = json.loads(data)
            except ValueError:
                pass
        return original

    def accept(self, command_id: str, op: str, route: Route) -> None:
        """Record a command as accepted, with the route its final reply must take even
        after a restart."""
        self._run(
            "INSERT OR REPLACE INTO recent (id, status, code, message, data, ts, op, "
            "reply_topic, correlation) VALUES (?, 'accepted', ?, 'interrupted', NULL, ?, ?, ?, ?)",
            (command_id, p.ReplyCode.ACCEPTED.value, time.time(), op, route.topic,
             route.correlation_data),
        )  # fmt: skip
        self._trim()

    def record(
        self,
        command_id: str,
        status: str,
        code: p.ReplyCode,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """Record how a command ended (its route, if accepted, is kept)."""
        try:
            encoded = json.dumps(data, default=str) if data is not None else None
        except (TypeError, ValueError) as exc:
            raise RecordError(f"data cannot be recorded: {exc}") from exc
        self._run(
            "INSERT INTO recent (id, status, code, message, data, ts) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, code = excluded.code, "
            "message = excluded.message, data = excluded.data, ts = excluded.ts",
            (command_id, status, code.value, message, encoded, time.time()),
        )
        self._trim()

    def note_stage(self, command_id: str, stage: str) -> None:
        """Remember the stage a running command reached, so that after a crash its
        ``interrupted`` reply can say where it stopped."""
        self._run(
            "UPDATE recent SET stage = ? WHERE id = ? AND status = 'accepted'",
            (stage[:64], command_id),
        )

    def unfinished(self) -> list[Unfinished]:
        """Commands accepted that never got a final reply (the agent stopped or died)."""
        rows = self._run(
            "SELECT id, op, reply_topic, correlation, stage FROM recent "
            "WHERE status = 'accepted' ORDER BY ts"
        )
        out = []
        for command_id, op, topic, correlation, stage in rows:
            route = Route(topic, bytes(correlation) if correlation is not None else None)
            out.append(Unfinished(command_id, op or "", route if topic else None, stage))
        return out

    def _trim(self) -> None:
        self._run(
            "DELETE FROM recent WHERE id NOT IN (SELECT id FROM recent ORDER BY ts DESC LIMIT ?)",
            (self._keep,),
        )

    def use_nonce(self, nonce: str, now: float, window_s: float) -> bool:
        """False if the nonce was already seen within the window (a replay)."""
        with self._lock:
            if self._db is None:
                raise RecordError("the command record is closed")
            try:
                self._db.execute("DELETE FROM nonces WHERE ts < ?", (now - 2 * window_s,))
                self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, now))
            except sqlite3.IntegrityError:
                return False
            except (sqlite3.Error, UnicodeError, ValueError) as exc:
                raise RecordError(f"{type(exc).__name__}: {exc}") from exc
            return True


# The name this class had while it lived in commands.py.
RecentCommands = CommandRecord
