"""Store-and-forward for results and telemetry: SQLite (WAL) under the state directory.

The outbox owns its queue. Producers only call ``enqueue_*``, which puts the message
object on an in-memory queue and returns: no I/O, no serialisation, no locks held
for long, so the inference loop never waits. The ``outbox`` thread does the rest:
it assigns the per-device ``seq`` (persisted with the rows, so it never goes
backwards across restarts), serialises, writes batches to SQLite, keeps the queue
within its size and age bounds (oldest telemetry dropped first, then oldest
results; every drop counted), publishes in order at QoS 1 when the link is up, and
deletes a row only after the broker's PUBACK.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Link
from agent.threads import SUPPORT_NICE, lower_priority

log = logging.getLogger(__name__)

TELEMETRY, RESULT = 0, 1
_KIND_NAMES = {TELEMETRY: "telemetry", RESULT: "results"}

# Messages waiting in memory for the writer; past this the writer is badly stuck and
# new messages are dropped (and counted) rather than growing memory without bound.
MAX_INTAKE = 50_000
# A publish with no PUBACK for this long while connected is sent again (paho resends
# after a reconnect by itself; this covers a broker that lost the session).
ACK_TIMEOUT_S = 30.0
_AGE_CHECK_S = 10.0
_BATCH = 2000
# After the first message wakes the writer it waits this long for more, so that one
# transaction and one wake-up serve a burst: at hundreds of results a second this
# halves the outbox's CPU, for a few milliseconds of latency on a result.
_LINGER_S = 0.005

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COUNTERS = ("next_seq", "published", "dropped_telemetry", "dropped_results")


@dataclass
class _Inflight:
    sent_at: float
    size: int
    kind: int


class Outbox:
    def __init__(
        self, config: AgentConfig, link: Link, clock: Callable[[], float] = time.time
    ) -> None:
        self.path: Path = config.state_dir / "outbox.sqlite3"
        self._bounds = config.outbox
        self._link = link
        self._clock = clock
        self.device = config.device.id
        self._topics = p.Topics(config.mqtt.topic_prefix)
        self._intake: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread: threading.Thread | None = None
        self._open_error: BaseException | None = None
        # Owned by the outbox thread; other threads only read these numbers.
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.depth = 0
        self.bytes = 0
        self.dropped_intake = 0
        self._inflight: dict[int, _Inflight] = {}
        self._last_sent = 0
        self._db: sqlite3.Connection | None = None
        self.heartbeat = time.monotonic()  # the outbox loop's, for the supervisor

    # ------------------------------------------------------------------- producers

    def enqueue_result(self, result: p.Result) -> bool:
        """Hand over one result; its ``seq`` is assigned by the outbox. Never blocks."""
        return self._enqueue(RESULT, None, result)

    def enqueue_telemetry(self, telemetry: p.Telemetry) -> bool:
        """Hand over telemetry; ``seq`` and ``outbox_depth`` are filled in. Never blocks."""
        return self._enqueue(TELEMETRY, None, telemetry)

    def _enqueue(self, kind: int, topic: str | None, message: p.Message) -> bool:
        if self._intake.qsize() >= MAX_INTAKE:
            self.dropped_intake += 1
            return False
        self._intake.put((kind, topic, message))
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "depth": self.depth + self._intake.qsize(),
            "bytes": self.bytes,
            "inflight": len(self._inflight),
            "published": self.counters["published"],
            "next_seq": self.counters["next_seq"],
            "dropped": {
                "telemetry": self.counters["dropped_telemetry"],
                "results": self.counters["dropped_results"],
                "intake": self.dropped_intake,
            },
        }

    # ------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        if not self._opened.wait(timeout) or self._open_error is not None:
            self._thread.join(1)
            self._thread = None
            raise RuntimeError(f"outbox {self.path}: cannot open: {self._open_error}")
        self._link.add_connect_listener(lambda: self._intake.put(("connected",)))

    def thread(self) -> threading.Thread | None:
        """The outbox thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """Write every handed-over message to disk, then close."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._intake.put(("wake",))
        thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------ the outbox thread

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        for key, value in db.execute("SELECT key, value FROM meta"):
            if key in self.counters:
                self.counters[key] = int(value)
        depth, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self.depth, self.bytes = int(depth), int(size)
        if self.depth:
            log.info("outbox: %d message(s) from before the restart to send", self.depth)
        return db

    def _run(self) -> None:
        lower_priority(SUPPORT_NICE)
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        next_age_check = 0.0
        try:
            while True:
                self.heartbeat = time.monotonic()
                stopping = self._stop.is_set()
                try:
                    self._drain_intake(block=not stopping)
                    if stopping:
                        break
                    now = time.monotonic()
                    if now >= next_age_check:
                        self._drop_aged()
                        next_age_check = now + _AGE_CHECK_S
                    if self._link.connected:
                        self._resend_overdue(now)
                        self._send()
                except Exception:
                    # The thread must outlive a bad batch (or a full disk): a dead outbox
                    # would silently end every result and telemetry message.
                    log.exception("outbox: unexpected error; going on")
                    if self._db is not None and self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    if stopping or self._stop.wait(1.0):
                        break
        finally:
            self._db.close()
            self._db = None

    def _drain_intake(self, block: bool) -> None:
        items: list[tuple[Any, ...]] = []
        try:
            if block:
                items.append(self._intake.get(timeout=0.2))
                self._stop.wait(_LINGER_S)
            while len(items) < _BATCH:
                items.append(self._intake.get_nowait())
        except queue.Empty:
            pass
        if not items:
            return
        new: list[tuple[int, str, bytes, float]] = []
        acked: list[tuple[int, bool]] = []
        for item in items:
            if item[0] == "ack":
                acked.append((item[1], item[2]))
            elif item[0] == "connected":
                # paho is resending what was in flight; give it time before we do.
                now = time.monotonic()
                for entry in self._inflight.values():
                    entry.sent_at = now
            elif item[0] == "wake":
                pass
            else:
                new.append(self._serialise(item[0], item[1], item[2]))
        if new or acked:
            self._write(new, acked)

    def _serialise(
        self, kind: int, topic: str | None, message: p.Message
    ) -> tuple[int, str, bytes, float]:
        seq = self.counters["next_seq"]
        self.counters["next_seq"] = seq + 1
        update: dict[str, Any] = {"seq": seq}
        if isinstance(message, p.Result):
            topic = topic or self._topics.results(self.device, message.pipeline)
        elif isinstance(message, p.Telemetry):
            topic = topic or self._topics.telemetry(self.device)
            update["outbox_depth"] = self.depth
        assert topic is not None
        payload = message.model_copy(update=update).to_bytes()
        return kind, topic, payload, self._clock()

    def _write(
        self, new: list[tuple[int, str, bytes, float]], acked: list[tuple[int, bool]]
    ) -> None:
        db = self._db
        assert db is not None
        # A row sent again (no PUBACK in time) can be acknowledged twice, both times in
        # one batch: it is done once, and published if either copy was accepted.
        done: dict[int, bool] = {}
        for row_id, ok in acked:
            if row_id in self._inflight:
                done[row_id] = done.get(row_id, False) or ok
        db.execute("BEGIN")
        if new:
            db.executemany(
                "INSERT INTO messages (kind, topic, payload, created) VALUES (?, ?, ?, ?)", new
            )
            self.depth += len(new)
            self.bytes += sum(len(row[2]) for row in new)
        if done:
            db.executemany("DELETE FROM messages WHERE id = ?", [(row_id,) for row_id in done])
            for row_id, ok in done.items():
                entry = self._inflight.pop(row_id)
                self.depth -= 1
                self.bytes -= entry.size
                if ok:
                    self.counters["published"] += 1
                else:
                    self._count_drop(entry.kind, 1)
            refused = sum(not ok for ok in done.values())
            if refused:
                log.warning("outbox: the broker refused %d message(s)", refused)
        if self.depth > self._bounds.max_messages or self.bytes > self._bounds.max_bytes:
            self._enforce_bounds()
        self._save_counters()
        db.execute("COMMIT")

    def _save_counters(self) -> None:
        assert self._db is not None
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(self.counters.items())
        )

    def _count_drop(self, kind: int, n: int) -> None:
        self.counters[f"dropped_{_KIND_NAMES[kind]}"] += n

    def _enforce_bounds(self) -> None:
        """Drop the oldest telemetry, then the oldest results, until within bounds."""
        db = self._db
        assert db is not None
        for kind in (TELEMETRY, RESULT):
            excess_n = self.depth - self._bounds.max_messages
            excess_b = self.bytes - self._bounds.max_bytes
            if excess_n <= 0 and excess_b <= 0:
                return
            victims: list[int] = []
            freed_b = 0
            for row_id, size in db.execute(
                "SELECT id, LENGTH(payload) FROM messages WHERE kind = ? ORDER BY id", (kind,)
            ):
                if len(victims) >= excess_n and freed_b >= excess_b:
                    break
                victims.append(row_id)
                freed_b += size
            self._delete(victims, freed_b, kind)
            log.warning(
                "outbox full: dropped the %d oldest %s message(s)", len(victims), _KIND_NAMES[kind]
            )

    def _delete(self, row_ids: list[int], size: int, kind: int) -> None:
        assert self._db is not None
        self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in row_ids])
        for row_id in row_ids:
            self._inflight.pop(row_id, None)
        self.depth -= len(row_ids)
        self.bytes -= size
        self._count_drop(kind, len(row_ids))

    def _drop_aged(self) -> None:
        db = self._db
        assert db is not None
        cutoff = self._clock() - self._bounds.max_age_s
        rows = db.execute(
            "SELECT id, kind, LENGTH(payload) FROM messages WHERE created < ? ORDER BY id",
            (cutoff,),
        ).fetchall()
        if not rows:
            return
        db.execute("BEGIN")
        for kind in (TELEMETRY, RESULT):
            mine = [(i, s) for i, k, s in rows if k == kind]
            if mine:
                self._delete([i for i, _ in mine], sum(s for _, s in mine), kind)
        self._save_counters()
        db.execute("COMMIT")
        log.warning(
            "outbox: dropped %d message(s) older than %ss", len(rows), self._bounds.max_age_s
        )

    def _on_ack(self, row_id: int, ok: bool) -> None:
        # Network thread: hand over only.
        self._intake.put(("ack", row_id, ok))

    def _send(self) -> None:
        room = self._bounds.max_inflight - len(self._inflight)
        if room <= 0 or self.depth <= len(self._inflight):
            return
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, kind, topic, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (self._last_sent, room),
        ).fetchall()
        now = time.monotonic()
        for row_id, kind, topic, payload in rows:
            if not self._link.publish(topic, payload, qos=1, on_ack=partial(self._on_ack, row_id)):
                return
            self._inflight[row_id] = _Inflight(now, len(payload), kind)
            self._last_sent = row_id

    def _resend_overdue(self, now: float) -> None:
        if not self._inflight:
            return
        first = next(iter(self._inflight.values()))
        if now - first.sent_at < ACK_TIMEOUT_S:
            return
        assert self._db is not None
        overdue = [i for i, e in self._inflight.items() if now - e.sent_at >= ACK_TIMEOUT_S]
        log.warning(
            "outbox: %d message(s) unacknowledged for %ss; sending again",
            len(overdue),
            ACK_TIMEOUT_S,
        )
        for row_id in overdue:
            row = self._db.execute(
                "SELECT topic, payload FROM messages WHERE id = ?", (row_id,)
            ).fetchone()
            entry = self._inflight.pop(row_id)
            if row is None:
                continue
            if self._link.publish(row[0], row[1], qos=1, on_ack=partial(self._on_ack, row_id)):
                entry.sent_at = now
            self._inflight[row_id] = entry
