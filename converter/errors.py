"""The converter's errors; each maps to an exit code and carries a one-line message."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_BUNDLE = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class ConverterError(Exception):
    """Bad input: a missing path, a file that is not a model, data of the wrong shape, ..."""

    exit_code = EXIT_BAD_INPUT


class UnquantizableOps(ConverterError):
    """The model holds ops that TFLite cannot run in full-integer int8."""

    def __init__(self, ops: list[str], what: str = "cannot be quantised to int8") -> None:
        self.ops = sorted(set(ops))
        super().__init__(f"model has ops that {what}: {', '.join(self.ops)}")


class AccuracyGateFailed(ConverterError):
    """The converted model lost more accuracy than ``--max-drop`` allows."""

    exit_code = EXIT_GATE_FAILED


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (toolchains raise pages), or its type."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
