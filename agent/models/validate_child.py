"""The validation child: load a model, allocate it, invoke it, describe its tensors,
and check its golden samples.

Run by ``agent.models.validate`` as ``python -m agent.models.validate_child`` in a
process of its own, so a model that crashes, hangs or eats memory takes only this
process down. Its arguments come as one JSON object on stdin (a golden block can pass
the 128 KB limit of one argv string; ``ARGS_JSON`` as the first argument works too, by
hand): ``model``, ``runtime``, ``num_threads``, ``memory_mb``, ``invokes``,
``golden`` (the manifest's block, or null) and ``input_shapes`` (the manifest's, to
which inputs with dynamic dims are resized; optional). The last stdout line is a JSON report:
``{"ok": true, "runtime": ..., "inputs": [...], "outputs": [...], "invoke_ms": ...,
"golden": figures | null}``, ``{"ok": false, "kind": "golden", "error": "...",
"golden": figures}`` when the device's outputs differ from the golden ones, or
``{"ok": false, "kind": "oom" | "error", "error": "..."}``.

Imports stay light (numpy and one TFLite runtime, never TensorFlow): this runs for
every deploy and at every start-up. ``agent.models.golden`` (and with it pydantic,
about 0.1 s more on an x86 laptop) is imported only when there are golden samples.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.models import runtime as rt

if TYPE_CHECKING:
    from agent.models.golden import Golden, OutputCheck

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
    if args.get("golden"):
        import agent.models.golden  # noqa: F401  (before the limit too, as the runtime)
    # The runtime is imported before the limit: its shared libraries are not the model's cost.
    _limit_memory(int(args["memory_mb"]))
    loaded = rt.load_model(
        args["model"],
        runtime=runtime,
        num_threads=int(args.get("num_threads", 1)),
        input_shapes=args.get("input_shapes"),
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
    figures = None
    if args.get("golden"):
        failed, figures = check_golden(loaded, args["golden"])
        if failed is not None:
            error = f"{failed} ({runtime} here)"
            return {"ok": False, "kind": "golden", "error": error, "golden": figures}
    return {
        "ok": True,
        "runtime": runtime.name,
        "runtime_version": runtime.version,
        "inputs": [asdict(i) for i in loaded.inputs],
        "outputs": [asdict(o) for o in loaded.outputs],
        "invoke_ms": min(timings),
        "golden": figures,
    }


class GoldenUnusable(Exception):
    """The golden block cannot be run on this model (one line)."""


def check_golden(loaded: rt.LoadedModel, data: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Run every golden sample; (why it fails or None, figures)."""
    from pydantic import ValidationError

    from agent.models.golden import Golden, GoldenError, compare, describe_failure, unpack_input

    try:
        golden = Golden.model_validate(data)
    except ValidationError as exc:
        first = str(exc).splitlines()
        raise GoldenUnusable(f"golden samples unusable: {' '.join(first[:3])}") from None
    interpreter = loaded.interpreter
    checks = []
    try:
        for s, sample in enumerate(golden.samples):
            _check_counts(s, len(sample.inputs), len(loaded.inputs), "inputs")
            _check_counts(s, len(sample.outputs), len(loaded.outputs), "outputs")
            for tensor, info in zip(sample.inputs, loaded.inputs, strict=True):
                if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                    raise GoldenUnusable(
                        f"golden sample {s} input is {tensor.dtype}{tensor.shape}, the "
                        f"model's {info.dtype}{list(info.shape)}"
                    )
                interpreter.set_tensor(info.index, unpack_input(tensor))
            interpreter.invoke()
            for o, info in enumerate(loaded.outputs):
                actual = interpreter.get_tensor(info.index)
                checks.append(compare(golden, s, o, actual, info.scale))
    except GoldenError as exc:
        raise GoldenUnusable(f"golden samples unusable: {exc}") from None
    figures = golden_figures(golden, checks)
    failing = [c for c in checks if c.over]
    if not failing:
        return None, figures
    worst = max(failing, key=lambda c: (c.checked == 0, c.worst, c.over))
    return describe_failure(worst, golden), figures


def _check_counts(sample: int, golden: int, model: int, what: str) -> None:
    if golden != model:
        raise GoldenUnusable(f"golden sample {sample} has {golden} {what}, the model {model}")


def golden_figures(golden: Golden, checks: Sequence[OutputCheck]) -> dict[str, Any]:
    """What the check saw, for replies and logs (JSON: no infinities)."""

    def worst(quantised: bool) -> float | None:
        values = [c.worst for c in checks if c.quantised == quantised and c.checked]
        if not values:
            return None
        top = max(values)
        return round(top, 6) if math.isfinite(top) else None

    return {
        "samples": len(golden.samples),
        "values": sum(c.checked for c in checks),
        "over": sum(c.over for c in checks),
        "worst_steps": worst(True),
        "worst_relative": worst(False),
        "tolerance_steps": golden.tolerance_steps,
        "tolerance_float": golden.tolerance_float,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        report = run(json.loads(argv[0] if argv else sys.stdin.read()))
    except GoldenUnusable as exc:
        report = {"ok": False, "kind": "error", "error": str(exc)}
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
