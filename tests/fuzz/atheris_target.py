"""One coverage-guided target: ``python -m tests.fuzz.atheris_target <name> [libFuzzer args]``.

Run by tests/fuzz/run.py (``make fuzz``). The agent's modules are instrumented, so
atheris steers mutations towards new branches of the decoders.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["agent", "tests.fuzz"]):
    from tests.fuzz import targets


def main() -> None:
    name = sys.argv[1]
    check = targets.TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
