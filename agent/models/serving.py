"""What the model lifecycle needs of whatever serves a model (the inference workers).

The lifecycle lives in ``agent.models`` and must not import ``agent.loops``; the
worker implements this protocol and the service hands the workers to the lifecycle.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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


# ------------------------------------------------------------------ shadow evaluation


@dataclass(frozen=True)
class ShadowFigures:
    """A candidate's shadow evaluation on one pipeline so far.

    ``agreement`` is the mean per-frame agreement with the serving version over the
    ``frames`` compared (None before the first); a frame the candidate failed on
    (``errors``) counts as a disagreement. ``distance`` is the PSI of the candidate's
    outputs from its own manifest's reference statistics (None without a reference).
    """

    frames: int
    agreement: float | None
    distance: float | None
    errors: int = 0
    last_error: str | None = None

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "frames": self.frames,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "distance": self.distance,
        }
        if self.errors:
            data["errors"] = self.errors
            data["last_error"] = self.last_error
        return data


class ShadowHandle(Protocol):
    """A running shadow evaluation (its own thread and interpreter)."""

    def figures(self) -> ShadowFigures: ...

    def stop(self) -> None:
        """End it and release the candidate's interpreter; ``figures`` keeps answering."""
        ...


class ShadowServer(ModelServer, Protocol):
    """A ModelServer that can also run a candidate beside the version it serves.
    Optional: the lifecycle skips shadow evaluation on a server without it."""

    def start_shadow(self, version: str, model_path: Path) -> Future[ShadowHandle]:
        """Build ``model_path`` off the hot path and start comparing it with the serving
        version on a sample of the live frames; the future fails when it cannot be
        built (or nothing is served to compare with)."""
        ...
