"""Thread priorities (the inference workers come first) and thread supervision.

Linux niceness is per thread. Every thread that only supports inference (capture,
results, outbox, MQTT) runs a little nicer than the workers, so that when they all
want the CPU at once the scheduler gives it to the invoke, and the supporting work
fills the gaps; building a model for a swap runs nicer still. On a 2-core machine
running a 1-thread model this cut the worker's waits for a CPU from 41 to 10 us a
frame and added about 3% to the frame rate. Raising niceness needs no privilege.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Capture, results, outbox and MQTT threads.
SUPPORT_NICE = 5
#: Building and releasing models for a swap.
BACKGROUND_NICE = 10


def lower_priority(nice: int) -> None:
    """Make the calling thread at least ``nice``; never raises (not Linux, no /proc)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)


# ------------------------------------------------------------------- supervision

#: Ends the process when a thread that cannot be restarted dies (EX_SOFTWARE): not 2,
#: which the unit's RestartPreventExitStatus keeps for an invalid config.
EXIT_THREAD_DIED = 70
#: Restarts of one thread allowed within RESTART_WINDOW_S before a death is fatal: a
#: thread that keeps dying in-process is better served by a fresh process.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0

#: Syscalls outside plain file, socket and thread work that the agent makes on purpose,
#: for the unit's SystemCallFilter (tests/test_systemd.py reads the unit against it):
#: per-thread niceness (getpriority, setpriority), the validation child's memory limit
#: (setrlimit is prlimit64 in glibc), prctl (runtimes, MemoryDenyWriteExecute).
SYSCALLS = ("getpriority", "setpriority", "prlimit64", "prctl")


@dataclass
class Watch:
    """One thread the supervisor keeps an eye on.

    ``thread`` returns the thread that should be running now, or None while none should
    (not started yet, being stopped, a finite source that ended): only a thread it
    returns can be found dead. ``heartbeat`` returns the monotonic time the loop last
    made progress, or None when it is not expected to (blocked by design). ``restart``
    starts a fresh thread in place of a dead one; None means a death ends the process.
    """

    name: str
    thread: Callable[[], threading.Thread | None]
    heartbeat: Callable[[], float | None] | None = None
    restart: Callable[[], None] | None = None
    stale_after_s: float | None = None


@dataclass
class ThreadHealth:
    """What a supervision pass found."""

    dead: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    #: The thread whose death ends the process, if any.
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return not self.dead and not self.stuck and self.fatal is None


class Supervisor:
    """Notices threads that died or stopped making progress.

    ``install()`` hooks ``threading.excepthook`` so that a thread's uncaught exception is
    kept (traceback text, by thread) for the report; ``check()`` is called every tick by
    the service and restarts what may be restarted. Counting and logging happen here,
    once per death and once per stall.
    """

    def __init__(
        self,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
    ) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._max_restarts = max_restarts
        self._window_s = restart_window_s
        self._watches: list[Watch] = []
        self._installed = False
        self._restarts: dict[str, list[float]] = {}
        self._stuck: set[str] = set()
        self.deaths = 0
        self.stalls = 0
        self.health = ThreadHealth()

    def watch(self, *watches: Watch) -> None:
        self._watches.extend(watches)

    def threads(self) -> dict[str, threading.Thread | None]:
        """Each watched thread by name, as its component reports it now."""
        return {w.name: w.thread() for w in self._watches}

    # ---------------------------------------------------------------- excepthook

    def install(self) -> None:
        """Keep the tracebacks of this supervisor's threads (one hook per process, shared
        by every agent in it: benchmarks run many)."""
        if not self._installed:
            _hook.acquire({w.name for w in self._watches})
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            _hook.release()
            self._installed = False

    # ---------------------------------------------------------------- checking

    def check(self) -> ThreadHealth:
        now = self._clock()
        health = ThreadHealth(fatal=self.health.fatal)
        stuck_now: set[str] = set()
        for w in self._watches:
            try:
                thread = w.thread()
            except Exception:
                logger.exception("supervisor: cannot read the %s thread", w.name)
                continue
            if thread is None:
                continue
            if not thread.is_alive():
                if thread.ident is None:
                    continue  # created, not started yet
                self._died(w, thread, now, health)
                continue
            beat = w.heartbeat() if w.heartbeat is not None else None
            stale = w.stale_after_s if w.stale_after_s is not None else self.stale_after_s
            if beat is not None and now - beat > stale:
                stuck_now.add(w.name)
                if w.name not in self._stuck:
                    self.stalls += 1
                    logger.error(
                        "thread %s has made no progress for %.0f s:\n%s",
                        w.name,
                        now - beat,
                        stack_of(thread),
                    )
        for name in self._stuck - stuck_now:
            logger.warning("thread %s makes progress again", name)
        self._stuck = stuck_now
        health.stuck = sorted(stuck_now)
        self.health = health
        return health

    def _died(self, w: Watch, thread: threading.Thread, now: float, health: ThreadHealth) -> None:
        self.deaths += 1
        text = _hook.traceback_of(thread) or "(it returned without an exception)\n"
        recent = [t for t in self._restarts.get(w.name, []) if now - t < self._window_s]
        if w.restart is not None and len(recent) < self._max_restarts:
            logger.error("thread %s died; restarting it:\n%s", w.name, text.rstrip())
            try:
                w.restart()
            except Exception:
                logger.exception("supervisor: cannot restart thread %s", w.name)
                health.dead.append(w.name)
                health.fatal = health.fatal or w.name
                return
            self._restarts[w.name] = [*recent, now]
            return
        why = "it cannot be restarted" if w.restart is None else "it keeps dying"
        logger.critical(
            "thread %s died and %s; ending the process:\n%s", w.name, why, text.rstrip()
        )
        health.dead.append(w.name)
        health.fatal = health.fatal or w.name


def stack_of(thread: threading.Thread) -> str:
    """Where a live thread is now (for a stall report)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "(no stack)"
    return "".join(traceback.format_stack(frame)).rstrip()


class _ExceptHook:
    """``threading.excepthook`` while any supervisor is installed: the traceback of a
    watched thread is kept for its supervisor's report (which logs it once, with what
    was done); any other thread's goes on to the hook that was there before."""

    _KEPT = 64  # tracebacks nobody collected (a thread replaced before a check)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._names: set[str] = set()
        self._previous: Callable[[threading.ExceptHookArgs], object] | None = None
        self._tracebacks: dict[int, str] = {}

    def acquire(self, names: set[str]) -> None:
        with self._lock:
            self._names |= names
            self._users += 1
            if self._users == 1:
                self._previous = threading.excepthook
                threading.excepthook = self._hook

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                if threading.excepthook == self._hook and self._previous is not None:
                    threading.excepthook = self._previous
                self._previous = None
                self._names.clear()
                self._tracebacks.clear()

    def traceback_of(self, thread: threading.Thread) -> str | None:
        with self._lock:
            return self._tracebacks.pop(id(thread), None)

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        # Runs as the thread dies: must not raise.
        thread = args.thread
        if thread is None or thread.name not in self._names:
            previous = self._previous or threading.__excepthook__
            previous(args)
            return
        with contextlib.suppress(Exception):
            text = "".join(
                traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
            )
            with self._lock:
                self._tracebacks[id(thread)] = text
                while len(self._tracebacks) > self._KEPT:
                    del self._tracebacks[next(iter(self._tracebacks))]


_hook = _ExceptHook()
