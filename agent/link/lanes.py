"""A lane: one named worker thread running jobs in order, with a bounded queue.

Long commands run on lanes so that a full lane answers ``busy`` at once instead
of queueing without bound, and so that one kind of work (a deploy) never makes
another (a rollback) wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class Lane:
    def __init__(self, name: str, max_pending: int) -> None:
        self.name = name
        self.max_pending = max_pending
        self._queue: queue.Queue[Job] = queue.Queue(max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def thread(self) -> threading.Thread | None:
        """The lane's thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def restart(self) -> None:
        """A fresh thread after the last one died; the queued jobs wait for it."""
        if not self._stop.is_set() and not self.alive:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the lane already holds ``max_pending`` or stops."""
        if self._stop.is_set():
            return False
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def stop(self, timeout: float) -> bool:
        """Drop the jobs not started, let the running one finish for up to ``timeout``
        seconds. True when the lane's thread has ended."""
        self._stop.set()
        dropped = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += 1
        if dropped:
            log.info("%s: %d queued command(s) dropped at stop", self.name, dropped)
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._stop.is_set():
                break
            started = time.monotonic()
            try:
                job()
            except Exception:
                # Jobs answer their own failures; this is a bug in one, not a reason
                # to end the lane.
                log.exception("%s: a job failed after %.1fs", self.name, time.monotonic() - started)
