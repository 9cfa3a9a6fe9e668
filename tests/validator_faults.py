"""A validation child that misbehaves on purpose: ``python tests/validator_faults.py MODE``
(the arguments come on stdin, as for the real child).

It is the real ``agent.models.validate_child`` with the runtime's loader replaced:
``abort`` kills the process (as a segfaulting model would), ``hang`` never returns,
``oom`` allocates far past the memory limit. Passed to ``Validator(child=...)``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.models import runtime as rt
from agent.models import validate_child


def _faulty_loader(mode: str) -> Any:
    def load(*args: Any, **kwargs: Any) -> Any:
        if mode == "abort":
            os.abort()
        if mode == "hang":
            time.sleep(3600)
        if mode == "oom":
            blocks = []
            for _ in range(64):
                blocks.append(bytearray(256 * 1024 * 1024))
        raise AssertionError(f"unknown fault {mode}")

    return load


def main() -> int:
    rt.load_model = _faulty_loader(sys.argv[1])  # type: ignore[assignment]
    return validate_child.main([])


if __name__ == "__main__":
    sys.exit(main())
