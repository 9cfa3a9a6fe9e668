"""What the model lifecycle needs of whatever serves a model (the inference workers).

The lifecycle lives in ``agent.models`` and must not import ``agent.loops``; the
worker implements this protocol and the service hands the workers to the lifecycle.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.models.validate import Requirements


@dataclass(frozen=True)
class SwapDone:
    """A swap's answer: the version now served (None: no model) and the one it replaced."""

    pipeline: str
    version: str | None
    previous: str | None
    build_ms: float


@dataclass(frozen=True)
class ServingStats:
    """How one version has done since it was switched in (its probation figures)."""

    version: str
    invokes: int
    errors: int
    nonfinite: int
    p50_ms: float | None
    p95_ms: float | None
    serving_s: float
    last_error: str | None = None


class ModelServer(Protocol):
    """One pipeline's inference worker, seen from the lifecycle."""

    @property
    def pipeline(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    def serving_version(self) -> str | None: ...

    def swap(self, version: str | None, model_path: Path | None) -> Future[SwapDone]:
        """Build, allocate and warm up ``model_path`` off the hot path, then switch it in
        between two inferences. ``version`` None unloads. The future fails when the
        new model cannot be built; the old one then keeps serving."""
        ...

    def stats(self, version: str) -> ServingStats | None: ...

    def requirements(self) -> Requirements | None:
        """What the pipeline needs of a model, or None to take the current model's shape."""
        ...
