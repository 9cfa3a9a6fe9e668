"""MQTT ingest: the console's events into the database, in batched transactions.

One thread (``ingest``) owns everything here. It drains ``console.events`` into
what it holds, and writes a batch (states and replies first, in arrival order, then
telemetry) in one transaction every ``batch_s`` or when ``max_batch`` events wait.
The paho thread only parses; nothing on it waits for the database.

Nothing is lost uncounted: every event received is, at any moment, either written,
dropped (with a reason), invalid (by kind) or held. A database error keeps the batch
and retries it with backoff, halving the batch each time (so one event the database
refuses is found and, after a few tries alone, dropped and counted); an outage is
retried for as long as it lasts. Past ``max_held`` events held, the oldest telemetry
is dropped first, counted. Retention runs every ``purge_every_s``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from agent.protocol import Telemetry
from fleet.console import (
    Event,
    InvalidEvent,
    ReplyEvent,
    ResultEvent,
    StateEvent,
    TelemetryEvent,
)

from .config import RetentionConfig
from .db import Database
from .ingest_writes import purge as purge_rows
from .ingest_writes import write_replies, write_states
from .telemetry_rollup import roll_up, upsert_device_telemetry, upsert_minutes

log = logging.getLogger(__name__)

# The database is away (connection refused, lost, pool exhausted): retried as long
# as it lasts. Anything else is a problem with the batch's content.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
# Tries of one event alone, refused by the database for its content, before it is dropped.
TRIES_ALONE = 3


def kind_of(event: Event) -> str:
    if isinstance(event, StateEvent):
        return "state"
    if isinstance(event, TelemetryEvent):
        return "telemetry"
    if isinstance(event, ReplyEvent):
        return "reply"
    if isinstance(event, ResultEvent):
        return "result"
    return "invalid"


def invalid_kind(topic: str) -> str:
    """The message kind of an invalid message's topic (``<prefix>/<device>/<kind>``)."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[-2] == "results":
        return "results"
    return parts[-1] if parts[-1] in ("state", "telemetry", "reply") else "other"


def _message_ts(event: StateEvent | TelemetryEvent | ReplyEvent) -> float:
    if isinstance(event, StateEvent):
        return event.state.ts
    if isinstance(event, TelemetryEvent):
        return event.telemetry.ts
    return event.reply.ts


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


@dataclass
class _Counters:
    """Written by the ingest thread, read by ``figures()``: guarded by one lock."""

    received: Counter[str] = field(default_factory=Counter)
    written: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    events_recorded: Counter[str] = field(default_factory=Counter)
    purged: Counter[str] = field(default_factory=Counter)
    stale_states: int = 0
    batches: int = 0
    db_errors: int = 0
    last_batch_s: float = 0.0
    last_batch_lag_s: float = 0.0
    max_batch_lag_s: float = 0.0


class Ingest:
    """Writes what the fleet says into the database; see the module docstring."""

    def __init__(
        self,
        database: Database,
        events: queue.Queue[Event],
        *,
        clock: Callable[[], float] = time.time,
        retention: RetentionConfig,
        batch_s: float = 0.2,
        max_batch: int = 5000,
        max_held: int = 200_000,
        purge_every_s: float = 600.0,
        stop_timeout_s: float = 5.0,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.database = database
        self.events = events
        self.retention = retention
        self._clock = clock
        self._batch_s = batch_s
        self._max_batch = max_batch
        self._max_held = max_held
        self._purge_every_s = purge_every_s
        self._stop_timeout_s = stop_timeout_s
        self._backoff_max_s = backoff_max_s
        # Held: taken off the queue, not yet written. Telemetry apart, so the memory
        # bound can drop the oldest of it first.
        self._telemetry: deque[TelemetryEvent] = deque()
        self._other: deque[StateEvent | ReplyEvent] = deque()
        self._limit = max_batch
        self._backoff = 0.0
        self._tries_alone = 0
        self._lock = threading.Lock()
        self._counts = _Counters()
        self._flush_waiters: list[threading.Event] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking events and write what is held and queued (for at most
        ``stop_timeout_s`` of retries); what cannot be written is counted dropped."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(self._stop_timeout_s + 10.0)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def alive(self) -> bool:
        """False only when the thread was started and died (a stopped ingest is no death)."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything queued so far; True when nothing is left held.

        While the thread runs, it does the work and this waits for it; otherwise
        the work is done here, on the caller's thread (nothing else touches what
        ingest holds then).
        """
        if not self.running:
            return self._write_everything(time.monotonic() + timeout)
        done = threading.Event()
        with self._lock:
            self._flush_waiters.append(done)
        if not done.wait(timeout):
            return False
        return self.held == 0

    @property
    def held(self) -> int:
        return len(self._telemetry) + len(self._other)

    # ------------------------------------------------------------------ figures

    def figures(self) -> dict[str, Any]:
        """For /metrics: counts by kind and reason, batches, queue depth and lag."""
        now = self._clock()
        oldest = self._oldest_received()
        with self._lock:
            c = self._counts
            return {
                "received": dict(c.received),
                "written": dict(c.written),
                "dropped": dict(c.dropped),
                "invalid": dict(c.invalid),
                "events_recorded": dict(c.events_recorded),
                "stale_states": c.stale_states,
                "purged": dict(c.purged),
                "batches": c.batches,
                "batch_limit": self._limit,
                "db_errors": c.db_errors,
                "last_batch_s": c.last_batch_s,
                "last_batch_lag_s": c.last_batch_lag_s,
                "max_batch_lag_s": c.max_batch_lag_s,
                "held": self.held,
                "queue_depth": self.events.qsize(),
                "lag_s": max(0.0, now - oldest) if oldest is not None else 0.0,
                "running": self.running,
            }

    def _oldest_received(self) -> float | None:
        candidates: list[float] = []
        for held in (self._other, self._telemetry):
            try:
                candidates.append(held[0].received)
            except IndexError:
                pass
        with self.events.mutex:
            if self.events.queue:
                candidates.append(self.events.queue[0].received)
        return min(candidates) if candidates else None

    # ---------------------------------------------------------------- retention

    def purge(self, now: float) -> dict[str, int]:
        """Delete telemetry minutes, replies, finished commands and events older than
        the retention settings; returns the rows deleted per table."""
        with self.database.session() as session:
            counts = purge_rows(session, self.retention, now)
        with self._lock:
            self._counts.purged.update(counts)
        if any(counts.values()):
            log.info("retention purged %s", counts)
        return counts

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        next_purge = time.monotonic() + self._purge_every_s
        while not self._stop.is_set():
            try:
                self._turn()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self._purge_every_s
                    self.purge(self._clock())
            except Exception:
                # Never the end of the thread: what it holds stays held.
                log.exception("ingest turn failed; going on")
                with self._lock:
                    self._counts.db_errors += 1
                self._stop.wait(1.0)
        self._write_everything(time.monotonic() + self._stop_timeout_s)
        self._answer_flushes()

    def _turn(self) -> None:
        with self._lock:
            flushing = bool(self._flush_waiters)
        if flushing:
            self._write_everything(time.monotonic() + 30.0)
            self._answer_flushes()
            return
        self._collect(self._batch_s)
        if self.held and not self._write_batch():
            self._stop.wait(self._backoff)

    def _answer_flushes(self) -> None:
        with self._lock:
            waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            waiter.set()

    def _collect(self, wait_s: float) -> None:
        """Gather events for up to ``wait_s`` (less once a batch is full), then take
        whatever else is queued."""
        deadline = time.monotonic() + wait_s
        while self.held < self._limit and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._take(self.events.get(timeout=remaining))
            except queue.Empty:
                break
            if self._flush_waiters:
                break
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._take(self.events.get_nowait())
            except queue.Empty:
                return

    def _take(self, event: Event) -> None:
        kind = kind_of(event)
        dropped: str | None = None
        with self._lock:
            self._counts.received[kind] += 1
            if isinstance(event, InvalidEvent):
                what = invalid_kind(event.topic)
                self._counts.invalid[what] += 1
                n = self._counts.invalid[what]
                if _power_of_ten(n):
                    log.warning(
                        "invalid %s message #%d on %r: %r", what, n, event.topic, event.problem
                    )
                return
            if isinstance(event, ResultEvent):
                self._counts.dropped["result_not_stored"] += 1
                return
            if not math.isfinite(_message_ts(event)):
                # A time that is no number cannot be ordered, nor put in a minute.
                self._counts.dropped[f"bad_ts_{kind}"] += 1
                return
        if isinstance(event, TelemetryEvent):
            self._telemetry.append(event)
        else:
            self._other.append(event)
        if self.held > self._max_held:
            held = self._telemetry if self._telemetry else self._other
            dropped = kind_of(held.popleft())
            with self._lock:
                self._counts.dropped[f"memory_bound_{dropped}"] += 1
                n = self._counts.dropped[f"memory_bound_{dropped}"]
            if _power_of_ten(n):
                log.warning(
                    "ingest holds over %d events: dropped %d oldest %s so far",
                    self._max_held,
                    n,
                    dropped,
                )

    # ------------------------------------------------------------------ writing

    def _write_everything(self, deadline: float) -> bool:
        """Drain the queue and write until nothing is held or the deadline passed."""
        self._drain()
        while self.held and time.monotonic() < deadline:
            if not self._write_batch():
                wait = min(self._backoff, max(0.0, deadline - time.monotonic()))
                # Stopping: the stop event no longer waits, and the backoff still must.
                if self._stop.is_set():
                    time.sleep(wait)
                else:
                    self._stop.wait(wait)
            self._drain()
        if self.held and self._stop.is_set():
            with self._lock:
                self._counts.dropped["unwritten_at_stop"] += self.held
            log.error("ingest stopped with %d event(s) it could not write", self.held)
            self._telemetry.clear()
            self._other.clear()
        return self.held == 0

    def _next_batch(self) -> tuple[list[StateEvent | ReplyEvent], list[TelemetryEvent]]:
        other: list[StateEvent | ReplyEvent] = []
        telemetry: list[TelemetryEvent] = []
        while self._other and len(other) < self._limit:
            other.append(self._other.popleft())
        while self._telemetry and len(other) + len(telemetry) < self._limit:
            telemetry.append(self._telemetry.popleft())
        return other, telemetry

    def _write_batch(self) -> bool:
        other, telemetry = self._next_batch()
        started = time.monotonic()
        try:
            with self.database.session() as session:
                recorded, stale = self._write(session, other, telemetry)
        except Exception as exc:
            self._telemetry.extendleft(reversed(telemetry))
            self._other.extendleft(reversed(other))
            self._failed(exc, len(other) + len(telemetry))
            return False
        now = self._clock()
        oldest = min((e.received for e in [*other[:1], *telemetry[:1]]), default=now)
        with self._lock:
            c = self._counts
            c.written.update(kind_of(e) for e in other)
            c.written["telemetry"] += len(telemetry)
            c.events_recorded.update(recorded)
            c.stale_states += stale
            c.batches += 1
            c.last_batch_s = time.monotonic() - started
            c.last_batch_lag_s = max(0.0, now - oldest)
            c.max_batch_lag_s = max(c.max_batch_lag_s, c.last_batch_lag_s)
        self._limit = min(self._max_batch, self._limit * 2)
        self._backoff = 0.0
        self._tries_alone = 0
        return True

    def _write(
        self,
        session: Session,
        other: list[StateEvent | ReplyEvent],
        telemetry: list[TelemetryEvent],
    ) -> tuple[Counter[str], int]:
        dialect = self.database.dialect
        states = [(e.state, e.received) for e in other if isinstance(e, StateEvent)]
        outcome = write_states(session, states)
        # Device rows made by states exist before the telemetry upserts meet them.
        session.flush()
        latest: dict[str, tuple[Telemetry, float]] = {}
        for e in telemetry:
            seen = latest.get(e.device)
            if seen is None or e.telemetry.ts >= seen[0].ts:
                latest[e.device] = (e.telemetry, e.received)
        upsert_device_telemetry(session, dialect, list(latest.values()))
        upsert_minutes(session, dialect, roll_up(e.telemetry for e in telemetry))
        replies = [(e.reply, e.received) for e in other if isinstance(e, ReplyEvent)]
        write_replies(session, replies)
        return Counter(outcome.events), outcome.ignored_old

    def _failed(self, exc: Exception, size: int) -> None:
        with self._lock:
            self._counts.db_errors += 1
            errors = self._counts.db_errors
        unavailable = isinstance(exc, UNAVAILABLE)
        if _power_of_ten(errors) or not unavailable:
            log.warning(
                "ingest batch of %d not written (%s, error #%d): %r",
                size,
                "database unavailable" if unavailable else "refused",
                errors,
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            )
        self._limit = max(1, self._limit // 2)
        if unavailable:
            self._backoff = min(self._backoff_max_s, max(BACKOFF_MIN_S, self._backoff * 2))
        else:
            # The content was refused: halve at once, to find the event that it was.
            self._backoff = 0.0
        if size == 1 and not unavailable:
            self._tries_alone += 1
            if self._tries_alone >= TRIES_ALONE:
                self._drop_refused(exc)

    def _drop_refused(self, exc: Exception) -> None:
        held = self._other if self._other else self._telemetry
        event = held.popleft()
        self._tries_alone = 0
        with self._lock:
            self._counts.dropped[f"refused_{kind_of(event)}"] += 1
        log.error(
            "dropped a %s the database refused %d times: %s",
            kind_of(event),
            TRIES_ALONE,
            type(exc).__name__,
        )
