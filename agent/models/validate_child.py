"""The validation child: load a model, allocate it, invoke it, describe its tensors.

Run by ``agent.models.validate`` as ``python -m agent.models.validate_child ARGS_JSON``
in a process of its own, so a model that crashes, hangs or eats memory takes only
this process down. ARGS_JSON holds ``model``, ``runtime``, ``num_threads``,
``memory_mb`` and ``invokes``. The last stdout line is a JSON report:
``{"ok": true, "runtime": ..., "inputs": [...], "outputs": [...], "invoke_ms": ...}``
or ``{"ok": false, "kind": "oom" | "error", "error": "..."}``.

Imports stay light (numpy and one TFLite runtime, never TensorFlow): this runs for
every deploy and at every start-up.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from agent.models import runtime as rt

_ENOMEM_MARKS = ("error '12'", "Cannot allocate memory", "ENOMEM", "bad_alloc")


def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _zeros(info: rt.TensorInfo) -> np.ndarray:
    return np.zeros(info.shape, dtype=np.dtype(info.dtype))


def run(args: dict[str, Any]) -> dict[str, Any]:
    runtime = rt.select_runtime(str(args.get("runtime", "auto")))
    # The runtime is imported before the limit: its shared libraries are not the model's cost.
    _limit_memory(int(args["memory_mb"]))
    loaded = rt.load_model(
        args["model"], runtime=runtime, num_threads=int(args.get("num_threads", 1))
    )
    interpreter = loaded.interpreter
    timings = []
    for _ in range(max(1, int(args.get("invokes", 2)))):
        for info in loaded.inputs:
            interpreter.set_tensor(info.index, _zeros(info))
        start = time.perf_counter()
        interpreter.invoke()
        timings.append((time.perf_counter() - start) * 1000)
        for info in loaded.outputs:
            interpreter.get_tensor(info.index)
    return {
        "ok": True,
        "runtime": runtime.name,
        "runtime_version": runtime.version,
        "inputs": [asdict(i) for i in loaded.inputs],
        "outputs": [asdict(o) for o in loaded.outputs],
        "invoke_ms": min(timings),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        report = run(json.loads(argv[0]))
    except MemoryError:
        report = {"ok": False, "kind": "oom", "error": "out of memory"}
    except Exception as exc:  # every refusal becomes a reason for the parent
        text = str(exc).strip().splitlines()
        first = text[0] if text else type(exc).__name__
        # The runtimes report a failed mmap/malloc under the limit as a load error (errno 12).
        oom = any(mark in first for mark in _ENOMEM_MARKS)
        report = {"ok": False, "kind": "oom" if oom else "error", "error": first}
    sys.stdout.write("\n" + json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
