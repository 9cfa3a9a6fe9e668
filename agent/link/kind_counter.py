"""Events counted by kind and logged sparingly: the command plane's record of what it
dropped or could not do, which a flood must not turn into a flood of log lines."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class KindCounter:
    """Events counted by kind; each kind logged the first time and then at every
    power of ten, so a flood cannot flood the log. ``count`` never raises: it is
    the last thing the commands thread does when everything else failed."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, kind: str, detail: str = "") -> None:
        try:
            with self._lock:
                n = self._counts.get(kind, 0) + 1
                self._counts[kind] = n
            if is_power_of_ten(n):
                log.warning("%s: %d of kind %s; latest: %r", self._what, n, kind, detail[:200])
        except Exception:
            pass  # counting must not end the thread

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def is_power_of_ten(n: int) -> bool:
    while n > 1 and n % 10 == 0:
        n //= 10
    return n == 1
