"""Thread priorities: the inference workers come first.

Linux niceness is per thread. Every thread that only supports inference (capture,
results, outbox, MQTT) runs a little nicer than the workers, so that when they all
want the CPU at once the scheduler gives it to the invoke, and the supporting work
fills the gaps; building a model for a swap runs nicer still. On a 2-core machine
running a 1-thread model this cut the worker's waits for a CPU from 41 to 10 us a
frame and added about 3% to the frame rate. Raising niceness needs no privilege.
"""

from __future__ import annotations

import contextlib
import os
import threading

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
