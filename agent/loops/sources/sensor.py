"""Sensor samples (serial line, CSV/JSONL replay, stdin) gathered into sliding windows.

A line is one sample: numbers separated by commas or whitespace, or a JSON object
whose ``columns`` keys are taken in order. A CSV header line names the columns.
The serial port is read with termios directly, so no driver package is needed.
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import tty
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from agent.config import SensorSource
from agent.loops.sources.base import EndOfStream, Source, SourceError, register


class LineParser:
    """Turns text lines into float samples; learns column order from a header line."""

    def __init__(self, columns: list[str] | None) -> None:
        self.columns = columns
        self._index: list[int] | None = None
        self.bad_lines = 0

    def parse(self, line: str) -> list[float] | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                keys = self.columns or sorted(k for k, v in obj.items() if _is_number(v))
                return [float(obj[k]) for k in keys]
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1
                return None
        fields = [f for f in line.replace(",", " ").split() if f]
        try:
            values = [float(f) for f in fields]
        except ValueError:
            if self._index is None and self.columns:
                # A header: find the configured columns in it.
                try:
                    self._index = [fields.index(c) for c in self.columns]
                except ValueError:
                    raise SourceError(
                        f"columns {self.columns} not all in header {fields}"
                    ) from None
            elif self._index is None:
                self._index = list(range(len(fields)))
            else:
                self.bad_lines += 1
            return None
        if self._index is not None:
            try:
                return [values[i] for i in self._index]
            except IndexError:
                self.bad_lines += 1
                return None
        return values


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Windower:
    """Emits a (window, channels) array every ``hop`` samples once ``window`` are in."""

    def __init__(self, window: int, hop: int) -> None:
        self.window = window
        self.hop = hop
        self._buf: deque[list[float]] = deque(maxlen=window)
        self._since = 0

    def add(self, sample: list[float]) -> np.ndarray | None:
        if self._buf and len(sample) != len(self._buf[0]):
            raise SourceError(
                f"sample has {len(sample)} values, earlier samples had {len(self._buf[0])}"
            )
        self._buf.append(sample)
        self._since += 1
        if len(self._buf) == self.window and self._since >= self.hop:
            self._since = 0
            return np.asarray(self._buf, dtype=np.float32)
        return None


_BAUD = {
    9600: termios.B9600,
    19200: termios.B19200,
    38400: termios.B38400,
    57600: termios.B57600,
    115200: termios.B115200,
    230400: termios.B230400,
}


class SerialLines:
    """Lines from a tty in raw mode, read with a timeout."""

    def __init__(self, port: str, baudrate: int) -> None:
        if baudrate not in _BAUD:
            raise SourceError(f"unsupported baudrate {baudrate}; use one of {sorted(_BAUD)}")
        try:
            self.fd = os.open(port, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"cannot open serial port {port}: {exc.strerror}") from None
        try:
            tty.setraw(self.fd)
            attrs = termios.tcgetattr(self.fd)
            attrs[4] = attrs[5] = _BAUD[baudrate]
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        except termios.error as exc:
            os.close(self.fd)
            raise SourceError(f"{port} is not a serial port: {exc}") from None
        self.port = port
        self._pending = b""

    def readline(self, timeout: float) -> str | None:
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            try:
                chunk = os.read(self.fd, 4096)
            except OSError as exc:
                raise SourceError(f"serial port {self.port} failed: {exc.strerror}") from None
            if not chunk:
                raise SourceError(f"serial port {self.port} closed")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.fd)


@register("sensor")
class SensorWindows(Source):
    def __init__(self, config: SensorSource, stdin: IO[str] | None = None) -> None:
        self.config = config
        self._stdin = stdin
        self._lines: Iterator[str] | None = None
        self._file: IO[str] | None = None
        self._serial: SerialLines | None = None
        self._parser = LineParser(config.columns)
        self._windower = Windower(config.window, config.hop)

    @property
    def fps(self) -> float | None:
        if self.config.input == "file" and self.config.rate_hz:
            return self.config.rate_hz / self.config.hop
        return None

    @property
    def bad_lines(self) -> int:
        return self._parser.bad_lines

    def open(self) -> None:
        c = self.config
        self._parser = LineParser(c.columns)
        self._windower = Windower(c.window, c.hop)
        if c.input == "file":
            assert c.path is not None
            try:
                self._file = c.path.open(encoding="utf-8")
            except OSError as exc:
                raise SourceError(f"cannot open {c.path}: {exc.strerror}") from None
            self._lines = iter(self._file)
        elif c.input == "stdin":
            self._lines = iter(self._stdin or sys.stdin)
        else:
            assert c.port is not None
            self._serial = SerialLines(c.port, c.baudrate)

    def _next_line(self) -> str | None:
        if self._serial is not None:
            return self._serial.readline(timeout=0.2)
        assert self._lines is not None
        try:
            return next(self._lines)
        except StopIteration:
            raise EndOfStream() from None

    def read(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        # A window needs `hop` new samples; a serial read that times out returns None
        # so the capture thread can check for shutdown.
        while True:
            line = self._next_line()
            if line is None:
                return None
            sample = self._parser.parse(line)
            if sample is None:
                continue
            window = self._windower.add(sample)
            if window is not None:
                return window, {}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._serial is not None:
            self._serial.close()
            self._serial = None
