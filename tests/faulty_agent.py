"""``python -m tests.faulty_agent run <config>``: the real agent, with faults a test
triggers over MQTT, for daemon tests that need a thread to hang or die in a real
process. A command whose whole payload is one of these words does that and is not
otherwise handled:

- ``stall-commands``: the commands thread blocks for good (a hung handler);
- ``kill-outbox``: the outbox thread's next turn raises past its own ``except``;
- ``hang-at-exit``: something in the interpreter's own teardown blocks for good (an
  atexit handler here; in the field, a native library's finaliser).
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import Any

from agent.cli import main
from agent.link.base import Incoming
from agent.link.commands import CommandDispatcher
from agent.link.outbox import Outbox


class ThreadKill(BaseException):
    """Raised past every ``except Exception`` in a loop: it ends the thread."""


_kill_outbox = threading.Event()
_handle = CommandDispatcher._handle
_drain = Outbox._take_intake


def handle(self: CommandDispatcher, incoming: Incoming) -> None:
    if incoming.payload == b"stall-commands":
        threading.Event().wait()
    if incoming.payload == b"hang-at-exit":
        atexit.register(threading.Event().wait)
        return
    if incoming.payload == b"kill-outbox":
        _kill_outbox.set()
        return
    _handle(self, incoming)


def drain(self: Outbox, *args: Any, **kwargs: Any) -> None:
    if _kill_outbox.is_set():
        _kill_outbox.clear()
        raise ThreadKill("outbox")
    _drain(self, *args, **kwargs)


CommandDispatcher._handle = handle  # type: ignore[method-assign]
Outbox._take_intake = drain  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
