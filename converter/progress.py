"""A progress bar for calibration and validation, shown only on a terminal.

It writes to its own duplicate of the original stderr, so it stays visible while
TensorFlow's output is redirected (see ``tfimport.quiet_fds``).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream
        self._last_drawn = -1

    @classmethod
    def for_terminal(cls, label: str, total: int, enabled: bool = True) -> ProgressBar:
        """A bar on the terminal when stderr is one, otherwise a silent bar."""
        stream = None
        if enabled and sys.stderr.isatty():
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8")
        return cls(label, total, stream)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self._stream is None:
            return
        filled = WIDTH * self.done // self.total
        if filled == self._last_drawn and self.done != self.total:
            return
        self._last_drawn = filled
        bar = "#" * filled + "." * (WIDTH - filled)
        self._stream.write(f"\r{self.label:<12} [{bar}] {self.done}/{self.total}")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.write("\n")
            self._stream.close()
            self._stream = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
