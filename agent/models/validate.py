"""Validation of a model before it may serve, in a child process of its own.

The child (``agent.models.validate_child``) loads the model with the runtime the agent
uses, allocates it and invokes it on zeros, then runs the manifest's golden samples
(when it has any) and compares the outputs with the converter's, under an
address-space limit; the parent waits at most ``timeout_s``. Outputs that differ beyond
the golden tolerance fail validation with the figures (``ValidationFailed.data``).
A segfault or abort, a hang, memory exhaustion or an exception (``Encountered
unresolved custom op`` ...) become one-line reasons, and the agent process never
runs an unknown model before it has survived this.

The parent then checks the tensors against the manifest and against what the pipeline
expects (``Requirements``): a model that runs but does not fit is ``incompatible``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.models.golden import Golden
from agent.models.manifest import Manifest, input_shapes
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo
from agent.protocol import ReplyCode

logger = logging.getLogger(__name__)

CHILD_MODULE = "agent.models.validate_child"
_STDERR_TAIL = 2000


class ValidationFailed(Exception):
    """The model may not serve; ``code`` is validation_failed or incompatible. ``data``
    holds figures for the reply, e.g. ``{"golden": {...}}`` of a golden mismatch."""

    def __init__(self, code: ReplyCode, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True)
class TensorShape:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Requirements:
    """What a pipeline needs of the model it serves (None: anything goes).

    By default a pipeline needs what its current model has, since its pre- and
    post-processing were built around it: same task, same input tensors, same
    number of outputs.
    """

    task: str | None = None
    inputs: tuple[TensorShape, ...] | None = None
    output_count: int | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> Requirements:
        return cls(
            task=manifest.task,
            inputs=tuple(TensorShape(tuple(t.shape), t.dtype) for t in manifest.inputs),
            output_count=len(manifest.outputs),
        )


@dataclass(frozen=True)
class ValidationReport:
    runtime: str
    runtime_version: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    invoke_ms: float
    elapsed_s: float
    # The golden check's figures (samples, values, worst difference); None without samples.
    golden: dict[str, Any] | None = None


def _describe(tensors: Sequence[TensorShape | TensorInfo]) -> str:
    return ", ".join(f"{t.dtype}{list(t.shape)}" for t in tensors)


def check_fit(
    report: ValidationReport, manifest: Manifest, requirements: Requirements | None
) -> None:
    """Raise ``ValidationFailed(incompatible)`` when the model does not fit."""
    declared = [TensorShape(tuple(t.shape), t.dtype) for t in manifest.inputs]
    actual_in = [TensorShape(t.shape, t.dtype) for t in report.inputs]
    actual_out = [TensorShape(t.shape, t.dtype) for t in report.outputs]
    if declared != actual_in:
        raise ValidationFailed(
            ReplyCode.INCOMPATIBLE,
            f"model inputs {_describe(actual_in)} differ from the manifest's {_describe(declared)}",
        )
    declared_out = [TensorShape(tuple(t.shape), t.dtype) for t in manifest.outputs]
    if declared_out != actual_out:
        raise ValidationFailed(
            ReplyCode.INCOMPATIBLE,
            f"model outputs {_describe(actual_out)} differ from the manifest's "
            f"{_describe(declared_out)}",
        )
    try:
        check_outputs(manifest)
    except OutputMismatch as exc:
        raise ValidationFailed(ReplyCode.INCOMPATIBLE, str(exc)) from None
    if requirements is None:
        return
    if requirements.task is not None and manifest.task != requirements.task:
        raise ValidationFailed(
            ReplyCode.INCOMPATIBLE,
            f"task {manifest.task!r} does not fit the pipeline, which needs {requirements.task!r}",
        )
    if requirements.inputs is not None and tuple(actual_in) != requirements.inputs:
        raise ValidationFailed(
            ReplyCode.INCOMPATIBLE,
            f"model inputs {_describe(actual_in)} do not fit the pipeline, which feeds "
            f"{_describe(requirements.inputs)}",
        )
    if requirements.output_count is not None and len(actual_out) != requirements.output_count:
        raise ValidationFailed(
            ReplyCode.INCOMPATIBLE,
            f"model has {len(actual_out)} outputs; the pipeline reads {requirements.output_count}",
        )


class Validator:
    """Runs the validation child. ``child`` is the command after the interpreter
    (``-m agent.models.validate_child`` by default): tests name a module of theirs
    that wraps the real child with a loader that aborts, hangs or eats memory.
    """

    def __init__(
        self,
        *,
        runtime: str = "auto",
        num_threads: int = 1,
        timeout_s: float = 60.0,
        memory_mb: int = 1024,
        python: str = sys.executable,
        child: Sequence[str] = ("-m", CHILD_MODULE),
    ) -> None:
        self.runtime = runtime
        self.num_threads = num_threads
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._command = [python, *child]

    def run(
        self,
        model_path: Path,
        golden: Golden | None = None,
        input_shapes: list[list[int]] | None = None,
    ) -> ValidationReport:
        """Load and invoke the model in a child, and check its golden samples;
        ``ValidationFailed`` says why it may not serve. Inputs whose dims the file
        leaves dynamic are resized to ``input_shapes`` (the manifest's)."""
        args = {
            "model": os.fspath(model_path),
            "runtime": self.runtime,
            "num_threads": self.num_threads,
            "memory_mb": self.memory_mb,
            "invokes": 2,
            "golden": golden.model_dump(mode="json") if golden is not None else None,
            "input_shapes": input_shapes,
        }
        start = time.monotonic()
        try:
            # The arguments go on stdin: a golden block may pass the 128 KB of one argv string.
            proc = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ValidationFailed(
                ReplyCode.VALIDATION_FAILED, f"cannot start the validator: {exc}"
            ) from None
        try:
            out, err = proc.communicate(json.dumps(args).encode(), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise ValidationFailed(
                ReplyCode.VALIDATION_FAILED,
                f"validation timed out after {self.timeout_s:g}s (the model hangs); "
                "validator killed",
            ) from None
        elapsed = time.monotonic() - start
        return self._report(proc.returncode, out, err, elapsed)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()

    def _report(self, code: int, out: bytes, err: bytes, elapsed: float) -> ValidationReport:
        stderr = err.decode(errors="replace")[-_STDERR_TAIL:]
        oom = "bad_alloc" in stderr or "MemoryError" in stderr
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if oom:
                reason = f"out of memory (limit {self.memory_mb} MB): validator died of {name}"
            else:
                reason = f"model crashed the validator (signal {name})"
            raise ValidationFailed(ReplyCode.VALIDATION_FAILED, reason)
        report = self._last_json(out)
        if report is None:
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            why = f"out of memory (limit {self.memory_mb} MB)" if oom else tail[0]
            raise ValidationFailed(
                ReplyCode.VALIDATION_FAILED, f"validator exited with status {code}: {why}"
            )
        if not report.get("ok"):
            if report.get("kind") == "oom":
                reason = (
                    f"out of memory (limit {self.memory_mb} MB) while loading the model: "
                    f"{report.get('error')}"
                )
            else:
                reason = str(report.get("error", "unknown error"))
            golden = report.get("golden") if report.get("kind") == "golden" else None
            raise ValidationFailed(
                ReplyCode.VALIDATION_FAILED,
                reason,
                {"golden": golden} if isinstance(golden, dict) else None,
            )
        return ValidationReport(
            runtime=str(report["runtime"]),
            runtime_version=str(report["runtime_version"]),
            inputs=[_tensor(t) for t in report["inputs"]],
            outputs=[_tensor(t) for t in report["outputs"]],
            invoke_ms=float(report["invoke_ms"]),
            elapsed_s=elapsed,
            golden=report.get("golden") if isinstance(report.get("golden"), dict) else None,
        )

    @staticmethod
    def _last_json(out: bytes) -> dict[str, Any] | None:
        for line in reversed(out.decode(errors="replace").strip().splitlines()):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and "ok" in data:
                return data
        return None

    def validate(
        self, model_path: Path, manifest: Manifest, requirements: Requirements | None = None
    ) -> ValidationReport:
        """Run the child, then check the tensors against manifest and pipeline."""
        report = self.run(model_path, manifest.golden, input_shapes(manifest))
        check_fit(report, manifest, requirements)
        logger.info(
            "validated %s %s on %s in %.2fs (invoke %.2f ms, golden %s)",
            manifest.name,
            manifest.version,
            report.runtime,
            report.elapsed_s,
            report.invoke_ms,
            report.golden,
        )
        return report


def _tensor(data: dict[str, Any]) -> TensorInfo:
    return TensorInfo(
        name=str(data["name"]),
        index=int(data["index"]),
        shape=tuple(int(x) for x in data["shape"]),
        dtype=str(data["dtype"]),
        scale=float(data["scale"]),
        zero_point=int(data["zero_point"]),
    )
