"""Whether a runtime's reference kernels can run a model, tried in a child process.

The converter screens golden samples on a second interpreter built on the runtime's
reference kernels (``converter.reference.reference_kernels``). On some models
(the example MobileNetV2 on ai-edge-litert 2.3) building or running that interpreter
aborts the process (SIGABRT in ``allocate_tensors``), which no ``except`` can catch,
so it is tried here first: ``python -m converter.reference_probe`` reads one JSON
object on stdin (``model``: a .tflite path, ``runtime``: its name, ``shapes``: the
input shapes) and exits 0 when the interpreter allocates and invokes on zeros.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROBE_TIMEOUT_S = 120.0


PROBE = (sys.executable, "-m", "converter.reference_probe")


def survives(
    model: bytes,
    runtime: str,
    shapes: Sequence[Sequence[int]],
    command: Sequence[str] = PROBE,
) -> str | None:
    """None when the reference kernels run ``model``; else why not, in a few words.
    ``command`` is the child (tests name one that aborts)."""
    with tempfile.TemporaryDirectory(prefix="edge-ref-probe-") as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(model)
        args = {"model": os.fspath(path), "runtime": runtime, "shapes": [list(s) for s in shapes]}
        try:
            proc = subprocess.run(
                list(command),
                input=json.dumps(args).encode(),
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"they did not finish in {PROBE_TIMEOUT_S:g} s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"they crash on this model (signal {-proc.returncode})"
    tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
    return f"they fail on this model ({' '.join(tail) or f'exit {proc.returncode}'})"


def _probe(args: dict[str, object]) -> None:
    import numpy as np

    from agent.models import runtime as rt

    module = rt.import_runtime(args["runtime"]).module  # type: ignore[arg-type]
    kinds = getattr(module, "OpResolverType", None) or module.experimental.OpResolverType
    interpreter = module.Interpreter(
        model_path=args["model"], num_threads=1, experimental_op_resolver_type=kinds.BUILTIN_REF
    )
    rt.fit_inputs(interpreter, args["shapes"])  # type: ignore[arg-type]
    interpreter.allocate_tensors()
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interpreter.invoke()


if __name__ == "__main__":
    _probe(json.loads(sys.stdin.read()))
