"""Store-and-forward for results and telemetry: SQLite (WAL) under the state directory.

The outbox owns its queue. Producers only call ``enqueue_*``, which puts the message
object on an in-memory queue and returns: no I/O, no serialisation, no locks held
for long, so the inference loop never waits. The ``outbox`` thread does the rest:
it assigns the per-device ``seq`` (persisted with the rows, so it never goes
backwards across restarts), serialises, writes batches to SQLite, keeps the queue
within its size and age bounds (oldest telemetry dropped first, then oldest
results; every drop counted), publishes in order at QoS 1 when the link is up, and
deletes a row only after the broker's PUBACK.

Nothing is lost uncounted. ``accepted`` counts the messages ``enqueue_*`` returned
True for; each of them is, at every moment, exactly one of delivered (PUBACK),
dropped (by the bounds, by the broker, by a write that could not be done before
the stop deadline, or lost in memory at a crash, each counted by reason) or queued
(on disk or still in memory)::

    delivered + dropped + queued == accepted

The counters are written in the same transaction as the rows they describe, so
the identity holds across restarts too. A write that fails (a full disk) changes
nothing: its messages stay in memory, keep their place in order and are written
again later; ``seq`` is assigned inside the transaction, so a failed write gives
out no seq and a seq is never reused. Each commit also records how many messages
were accepted by then, so after a crash the ones that were still in memory at the
last commit are counted (``dropped.unclean_stop``); only those accepted after the
last commit, normally the writer's few milliseconds of linger, cannot be known.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
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

# Messages held in memory (handed over, not yet on disk); past this the writer is
# badly stuck (a full disk) and new messages are refused (counted) rather than
# growing memory without bound.
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
# A failed write (a full disk) is tried again after this, doubling up to the cap.
_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0
_FIT_MAX = 1 << 30
# Repeated warnings (outbox full, write failed) are logged at most this often, with
# the count of what happened since.
_WARN_EVERY_S = 10.0
# stop(): the part of its timeout kept for closing the database and the thread exit.
_STOP_MARGIN_S = 0.5

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
#: Why a message was dropped; each reason is a counter ``dropped_<reason>``.
#: telemetry / results: the queue's bounds (size, age) or the broker refused it;
#: write_failed: it could not be written before the stop deadline (a full disk);
#: unclean_stop: it was in memory when the process died (counted at the next start).
DROP_REASONS = ("telemetry", "results", "write_failed", "unclean_stop")
_COUNTERS = (
    "next_seq",
    "accepted",
    "refused",
    "published",
    *(f"dropped_{r}" for r in DROP_REASONS),
)

Connect = Callable[[Path], sqlite3.Connection]


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """The outbox's database connection (the seam a test replaces to make writes fail)."""
    return sqlite3.connect(path, isolation_level=None)


@dataclass
class _Inflight:
    sent_at: float
    size: int
    kind: int


class _Warnings:
    """One log line per kind of trouble per ``_WARN_EVERY_S``, carrying the count."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warn(self, key: str, n: int, message: str, *args: Any) -> None:
        self._count[key] = self._count.get(key, 0) + n
        now = time.monotonic()
        if now - self._last.get(key, -_WARN_EVERY_S) < _WARN_EVERY_S:
            return
        self._last[key] = now
        total = self._count.pop(key)
        log.warning("%s (%d since the last such warning)", message % args, total)


class Outbox:
    def __init__(
        self,
        config: AgentConfig,
        link: Link,
        clock: Callable[[], float] = time.time,
        connect: Connect = connect_sqlite,
    ) -> None:
        self.path: Path = config.state_dir / "outbox.sqlite3"
        self._bounds = config.outbox
        self._link = link
        self._clock = clock
        self._connect = connect
        self.device = config.device.id
        self._topics = p.Topics(config.mqtt.topic_prefix)
        self._intake: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread: threading.Thread | None = None
        self._open_error: BaseException | None = None
        self._stop_deadline = 0.0
        # Producer side, under _lock: messages accepted by and refused by enqueue_*
        # in this process, and whether the outbox still takes any.
        self._lock = threading.Lock()
        self._accepted_run = 0
        self._refused = 0
        self._closed = False
        # Owned by the outbox thread. _taken_run: messages of this process no longer in
        # memory (on disk or dropped); _accepted_base: accepted before this process.
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._accepted_base = self._refused_base = 0
        self._taken_run = 0
        self.depth = 0  # rows on disk
        self.bytes = 0
        self._pending: deque[tuple[int, str | None, p.Message]] = deque()
        self._acks: list[tuple[int, bool]] = []
        self._retry_at = 0.0
        self._retry_s = _RETRY_MIN_S
        # How many messages a write may carry: halved by each failed write, so that a
        # nearly full disk still takes what fits; doubled back by each success.
        self._fit = _FIT_MAX
        self.write_errors = 0
        self._warnings = _Warnings()
        self._inflight: dict[int, _Inflight] = {}
        self._last_sent = 0
        self._db: sqlite3.Connection | None = None
        # What stats() reports: a copy the outbox thread replaces after each change.
        self._view: dict[str, Any] = self._make_view()
        self.heartbeat = time.monotonic()  # the outbox loop's, for the supervisor

    # ------------------------------------------------------------------- producers

    def enqueue_result(self, result: p.Result) -> bool:
        """Hand over one result; its ``seq`` is assigned by the outbox. Never blocks."""
        return self._enqueue(RESULT, None, result)

    def enqueue_telemetry(self, telemetry: p.Telemetry) -> bool:
        """Hand over telemetry; ``seq`` and ``outbox_depth`` are filled in. Never blocks."""
        return self._enqueue(TELEMETRY, None, telemetry)

    def _enqueue(self, kind: int, topic: str | None, message: p.Message) -> bool:
        # The put is under the lock so that stop() sees every accepted message.
        with self._lock:
            if self._closed or self._accepted_run - self._taken_run >= MAX_INTAKE:
                self._refused += 1
                return False
            self._accepted_run += 1
            self._intake.put((kind, topic, message))
            return True

    def stats(self) -> dict[str, Any]:
        """The counters, from one consistent moment:
        ``delivered + sum(dropped.values()) + queued == accepted``. ``refused``
        (enqueue returned False: stopped, or too much in memory) is not accepted."""
        with self._lock:
            view = self._view
            accepted_run = self._accepted_run
            refused = self._refused
        in_memory = accepted_run - view["taken_run"]
        queued = view["on_disk"] + in_memory
        return {
            "accepted": view["accepted_base"] + accepted_run,
            "delivered": view["published"],
            "queued": queued,
            "on_disk": view["on_disk"],
            "in_memory": in_memory,
            "dropped": dict(view["dropped"]),
            "refused": view["refused_base"] + refused,
            "write_errors": view["write_errors"],
            # Older names, kept: depth is queued, published is delivered.
            "depth": queued,
            "published": view["published"],
            "bytes": view["bytes"],
            "inflight": view["inflight"],
            "next_seq": view["next_seq"],
        }

    def _make_view(self) -> dict[str, Any]:
        c = self.counters
        return {
            "accepted_base": self._accepted_base,
            "refused_base": self._refused_base,
            "taken_run": self._taken_run,
            "on_disk": self.depth,
            "bytes": self.bytes,
            "inflight": len(self._inflight),
            "published": c["published"],
            "next_seq": c["next_seq"],
            "write_errors": self.write_errors,
            "dropped": {r: c[f"dropped_{r}"] for r in DROP_REASONS},
        }

    def _update_view(self) -> None:
        view = self._make_view()
        with self._lock:
            self._view = view

    # ------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        with self._lock:
            self._closed = False
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

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new messages, write every accepted one to disk, then close; within
        ``timeout`` seconds. What cannot be written by then (the disk is full) is
        counted as dropped (``write_failed``)."""
        with self._lock:
            self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._stop_deadline = time.monotonic() + max(0.0, timeout - _STOP_MARGIN_S)
        self._stop.set()
        self._intake.put(("wake",))
        thread.join(timeout)
        if thread.is_alive():
            log.error("outbox: the writer did not finish within %ss", timeout)
        self._thread = None

    # ------------------------------------------------------------ the outbox thread

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect(self.path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
        for key in self.counters:
            self.counters[key] = int(stored.get(key, 0))
        depth, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self.depth, self.bytes = int(depth), int(size)
        accounted = self.counters["published"] + self._dropped_total() + self.depth
        # An outbox from before ``accepted`` was counted starts counting from here.
        lost = self.counters["accepted"] - accounted if "accepted" in stored else 0
        if lost > 0:
            self.counters["dropped_unclean_stop"] += lost
            log.warning(
                "outbox: %d accepted message(s) were still in memory when the agent last "
                "stopped uncleanly; counted as dropped (unclean_stop)",
                lost,
            )
        self.counters["accepted"] = self._accepted_base = accounted + max(lost, 0)
        self._refused_base = self.counters["refused"]
        try:
            db.execute("BEGIN")
            self._save_counters(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            # A full disk must not stop the start: the next write saves the counters.
            log.warning("outbox: cannot save the counters yet: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if self.depth:
            log.info("outbox: %d message(s) from before the restart to send", self.depth)
        return db

    def _dropped_total(self) -> int:
        return sum(self.counters[f"dropped_{r}"] for r in DROP_REASONS)

    def _run(self) -> None:
        lower_priority(SUPPORT_NICE)
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._update_view()
        self._opened.set()
        next_age_check = 0.0
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    self._take_intake(self._wait_s())
                    now = time.monotonic()
                    if (self._pending or self._acks) and now >= self._retry_at:
                        self._flush(_BATCH)
                    if self._stop.is_set():
                        break
                    if now >= next_age_check:
                        self._drop_aged()
                        next_age_check = now + _AGE_CHECK_S
                    if self._link.connected:
                        self._resend_overdue(now)
                        self._send()
                except Exception:
                    # The thread must outlive a bad batch: a dead outbox would silently
                    # end every result and telemetry message.
                    log.exception("outbox: unexpected error; going on")
                    if self._stop.wait(1.0):
                        break
            self._persist_all()
        finally:
            self._db.close()
            self._db = None

    def _wait_s(self) -> float:
        """How long the writer may wait for the intake: not at all while a backlog
        can be written, until the retry while a failed write waits for it."""
        if not (self._pending or self._acks):
            return 0.2
        return max(0.0, min(0.2, self._retry_at - time.monotonic()))

    def _take_intake(self, wait_s: float) -> None:
        """Move what producers and the network thread handed over into the writer's
        own lists: messages to ``_pending``, acknowledgements to ``_acks``."""
        items: list[tuple[Any, ...]] = []
        try:
            if wait_s > 0:
                items.append(self._intake.get(timeout=wait_s))
                self._stop.wait(_LINGER_S)
            while len(items) < _BATCH:
                items.append(self._intake.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            tag = item[0]
            if tag == "ack":
                self._acks.append((item[1], item[2]))
            elif tag == "connected":
                # paho is resending what was in flight; give it time before we do.
                now = time.monotonic()
                for entry in self._inflight.values():
                    entry.sent_at = now
            elif tag != "wake":
                self._pending.append(item)

    def _flush(self, limit: int) -> bool:
        """Write up to ``limit`` pending messages and every pending acknowledgement in
        one transaction. A failed write leaves them all pending and schedules a retry."""
        batch = [self._pending[i] for i in range(min(limit, self._fit, len(self._pending)))]
        try:
            self._transaction(partial(self._write, batch, self._acks))
        except (sqlite3.Error, OSError) as exc:
            self.write_errors += 1
            self._fit = max(1, len(batch) // 2)
            # A smaller write may fit at once; when not even one does, back off.
            self._retry_at = time.monotonic() + (self._retry_s if len(batch) <= 1 else 0.0)
            self._warnings.warn(
                "write",
                1,
                "outbox: cannot write %d message(s) (%s); %d held in memory to try again",
                len(batch),
                exc,
                len(self._pending),
            )
            if len(batch) <= 1:
                self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
            with contextlib.suppress(sqlite3.Error, OSError):
                # Record how many are accepted (only existing rows change, which a full
                # database usually allows): a crash now is then counted at the next start.
                self._transaction(lambda db: None)
            self._update_view()
            return False
        for _ in batch:
            self._pending.popleft()
        self._acks = []
        self._retry_s = _RETRY_MIN_S
        self._retry_at = 0.0
        self._fit = min(self._fit * 2, _FIT_MAX)
        self._update_view()
        return True

    def _transaction(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``work`` and save the counters in one transaction. On failure the
        database and every in-memory figure are as before (seqs included)."""
        db = self._db
        assert db is not None
        saved = (
            dict(self.counters),
            self.depth,
            self.bytes,
            dict(self._inflight),
            self._taken_run,
        )
        try:
            db.execute("BEGIN")
            work(db)
            with self._lock:
                accepted_now = self._accepted_base + self._accepted_run
                refused_now = self._refused_base + self._refused
            self.counters["accepted"] = accepted_now
            self.counters["refused"] = refused_now
            self._save_counters(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            (counters, self.depth, self.bytes, self._inflight, self._taken_run) = saved
            self.counters = counters
            raise

    def _write(
        self,
        batch: list[tuple[int, str | None, p.Message]],
        acked: list[tuple[int, bool]],
        db: sqlite3.Connection,
    ) -> None:
        new: list[tuple[int, str, bytes, float]] = []
        for kind, topic, message in batch:
            try:
                new.append(self._serialise(kind, topic, message))
            except (ValueError, TypeError):
                # Not a disk problem: this message can never be written.
                log.exception("outbox: cannot serialise a %s message", _KIND_NAMES[kind])
                self.counters["dropped_write_failed"] += 1
        self._taken_run += len(batch)
        # A row sent again (no PUBACK in time) can be acknowledged twice, both times in
        # one batch: it is done once, and published if either copy was accepted.
        done: dict[int, bool] = {}
        for row_id, ok in acked:
            if row_id in self._inflight:
                done[row_id] = done.get(row_id, False) or ok
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
                self._warnings.warn(
                    "refused", refused, "outbox: the broker refused %d message(s)", refused
                )
        if self.depth > self._bounds.max_messages or self.bytes > self._bounds.max_bytes:
            self._enforce_bounds(db)

    def _serialise(
        self, kind: int, topic: str | None, message: p.Message
    ) -> tuple[int, str, bytes, float]:
        seq = self.counters["next_seq"]
        update: dict[str, Any] = {"seq": seq}
        if isinstance(message, p.Result):
            topic = topic or self._topics.results(self.device, message.pipeline)
        elif isinstance(message, p.Telemetry):
            topic = topic or self._topics.telemetry(self.device)
            update["outbox_depth"] = self.depth
        assert topic is not None
        payload = message.model_copy(update=update).to_bytes()
        self.counters["next_seq"] = seq + 1
        return kind, topic, payload, self._clock()

    def _persist_all(self) -> None:
        """At stop: write everything accepted, in as few transactions as the deadline
        allows; count what is left as dropped (``write_failed``)."""
        while True:
            try:
                item = self._intake.get_nowait()
            except queue.Empty:
                break
            if item[0] == "ack":
                self._acks.append((item[1], item[2]))
            elif item[0] not in ("connected", "wake"):
                self._pending.append(item)
        while (self._pending or self._acks) and time.monotonic() < self._stop_deadline:
            # One transaction for the whole backlog: 50,000 rows take well under a
            # second, where 25 transactions of 2000 would pay 25 commits.
            if not self._flush(len(self._pending)):
                # No backing off now: smaller writes are tried until the deadline.
                time.sleep(max(0.0, min(0.05, self._stop_deadline - time.monotonic())))
        if not self._pending:
            return
        lost = len(self._pending)
        self._pending.clear()
        self._taken_run += lost
        self.counters["dropped_write_failed"] += lost
        log.error(
            "outbox: %d message(s) could not be written before the stop deadline; "
            "counted as dropped (write_failed)",
            lost,
        )
        with contextlib.suppress(sqlite3.Error, OSError):
            # Only counters: existing rows are updated, so this can succeed on a full
            # disk; when it cannot, the next start counts them (unclean_stop).
            self._transaction(lambda db: None)
        self._update_view()

    def _save_counters(self, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(self.counters.items())
        )

    def _count_drop(self, kind: int, n: int) -> None:
        self.counters[f"dropped_{_KIND_NAMES[kind]}"] += n

    def _enforce_bounds(self, db: sqlite3.Connection) -> None:
        """Drop the oldest telemetry, then the oldest results, until within bounds."""
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
            if not victims:
                continue
            self._delete(db, victims, freed_b, kind)
            self._warnings.warn(
                f"full-{kind}",
                len(victims),
                "outbox full: dropped the %d oldest %s message(s)",
                len(victims),
                _KIND_NAMES[kind],
            )

    def _delete(self, db: sqlite3.Connection, row_ids: list[int], size: int, kind: int) -> None:
        db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in row_ids])
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

        def drop(db: sqlite3.Connection) -> None:
            for kind in (TELEMETRY, RESULT):
                mine = [(i, s) for i, k, s in rows if k == kind]
                if mine:
                    self._delete(db, [i for i, _ in mine], sum(s for _, s in mine), kind)

        try:
            self._transaction(drop)
        except (sqlite3.Error, OSError) as exc:
            self._warnings.warn("aged-failed", 1, "outbox: cannot drop aged messages: %s", exc)
            return
        self._update_view()
        self._warnings.warn(
            "aged",
            len(rows),
            "outbox: dropped %d message(s) older than %ss",
            len(rows),
            self._bounds.max_age_s,
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
                break
            self._inflight[row_id] = _Inflight(now, len(payload), kind)
            self._last_sent = row_id
        if rows:
            self._update_view()

    def _resend_overdue(self, now: float) -> None:
        if not self._inflight:
            return
        first = next(iter(self._inflight.values()))
        if now - first.sent_at < ACK_TIMEOUT_S:
            return
        assert self._db is not None
        overdue = [i for i, e in self._inflight.items() if now - e.sent_at >= ACK_TIMEOUT_S]
        self._warnings.warn(
            "overdue",
            len(overdue),
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
