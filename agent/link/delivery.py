"""What the two artifact transports share: one verified file to fetch, and how it ends.

``ArtifactFetcher`` (``transfer.py``) verifies a deploy's manifest and signature,
then hands a ``Delivery`` to the transport for the artifact's kind: the URL fetcher
(``fetch_url.py``) or the chunk receiver (``chunks.py``). A transport writes the
file at ``delivery.part`` and raises ``CommandFailed`` when it cannot; it checks
``delivery.check()`` often, so a stop or the deadline ends it within about a second.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from agent import protocol as p

# Longest a transport blocks between two looks at the stop event and the deadline.
POLL_S = 0.25

A_contra = TypeVar("A_contra", contravariant=True)


def fail(message: str, code: p.ReplyCode = p.ReplyCode.DOWNLOAD_FAILED) -> p.CommandFailed:
    return p.CommandFailed(code, message)


def storage_failed(exc: OSError) -> p.CommandFailed:
    """A failed write of the file being fetched (``storage_failed``, not a network error)."""
    return fail(
        f"cannot write the model file: {exc.strerror or exc}"
        + (" (disk full)" if exc.errno == errno.ENOSPC else ""),
        p.ReplyCode.STORAGE_FAILED,
    )


@dataclass
class Delivery:
    """One model file on its way to ``part``: its verified size, the cap and the clock."""

    part: Path
    size: int
    progress: p.Progress
    stop: threading.Event
    deadline: float  # time.monotonic() by which the file must be complete
    deadline_s: float = field(default=0.0)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise ``download_failed`` when the agent is stopping or the deadline passed."""
        if self.stop.is_set():
            raise fail("download aborted: the agent is stopping")
        if self.remaining() <= 0:
            raise fail(
                f"download did not finish within transfer.deadline_s ({self.deadline_s:g} s)"
            )

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking for a stop; then ``check()``."""
        self.stop.wait(max(0.0, min(seconds, self.remaining())))
        self.check()


class Transport(Protocol[A_contra]):
    """One way a model file reaches the device."""

    def precheck(self, artifact: A_contra, size: int) -> None:
        """Refuse (``CommandFailed``) what cannot be fetched, before any byte or file."""

    def receive(self, artifact: A_contra, delivery: Delivery) -> None:
        """Write the file at ``delivery.part``, or raise ``CommandFailed``."""

    def interrupt(self) -> None:
        """Wake a ``receive`` blocked in I/O (called from another thread on stop)."""
