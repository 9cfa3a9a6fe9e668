"""The ``shadow`` stage of a deploy: between validation and the swap, the candidate runs
beside the serving version on live frames, and is swapped in only if it agrees.

Decisions:
- It runs when ``probation.shadow`` (or the deploy's ``shadow``) is on and a pipeline
  serves a previous version; a server that cannot shadow (no ``start_shadow``) or
  serves nothing is left out, and with none left the stage is skipped.
- It waits until ``shadow_frames`` frames were compared on every pipeline (each
  pipeline's evaluation ends once it has its frames, so it stops costing CPU there),
  then the candidate passes when on every pipeline its agreement is at least
  ``min_agreement`` (the deploy's, else the config's) and its distance from its own
  reference statistics is at most ``max_distance`` (no reference: no distance rule).
- Too few frames within ``shadow_timeout_s`` refuses it: like probation, a candidate
  nobody saw work is not promoted.
- A refusal is ``shadow_rejected`` with the figures per pipeline in the reply's data;
  a candidate that cannot even be built on a pipeline is ``validation_failed`` (as a
  swap that cannot build it); an agent stop ends the stage with ``interrupted``. In
  every case the caller removes the version: it never served.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from agent.config import ProbationConfig
from agent.models.serving import ModelServer, ShadowFigures, ShadowHandle, ShadowServer
from agent.protocol import CommandFailed, Progress, ReplyCode, Stage

logger = logging.getLogger(__name__)

STAGE: Stage = "shadow"


@dataclass(frozen=True)
class ShadowRule:
    frames: int
    timeout_s: float
    min_agreement: float
    max_distance: float

    @classmethod
    def of(
        cls,
        probation: ProbationConfig,
        shadow: bool | None = None,
        min_agreement: float | None = None,
    ) -> ShadowRule | None:
        """The rule for one deploy, or None when it skips the stage."""
        if not (probation.shadow if shadow is None else shadow):
            return None
        return cls(
            frames=probation.shadow_frames,
            timeout_s=probation.shadow_timeout_s,
            min_agreement=probation.min_agreement if min_agreement is None else min_agreement,
            max_distance=probation.max_distance,
        )

    def problem(self, figures: ShadowFigures) -> str | None:
        """Why ``figures`` (of enough frames) fail the rule, or None."""
        agreement = figures.agreement if figures.agreement is not None else 0.0
        if agreement < self.min_agreement:
            errors = (
                f", {figures.errors} failed frames ({figures.last_error})" if figures.errors else ""
            )
            return f"agreement {agreement:.3f} < {self.min_agreement:g}{errors}"
        if figures.distance is not None and figures.distance > self.max_distance:
            return f"distance {figures.distance:g} > {self.max_distance:g}"
        return None


def shadow_servers(servers: list[ModelServer], version: str) -> list[ShadowServer]:
    """The servers the candidate can run beside: they shadow and serve another version."""
    able = []
    for server in servers:
        serving = server.serving_version()
        if callable(getattr(server, "start_shadow", None)) and serving not in (None, version):
            able.append(cast(ShadowServer, server))
    return able


def progress_data(figures: dict[str, ShadowFigures]) -> dict[str, Any]:
    """Over the pipelines: the fewest frames, the lowest agreement, the largest distance."""
    agreements = [f.agreement for f in figures.values() if f.agreement is not None]
    distances = [f.distance for f in figures.values() if f.distance is not None]
    return {
        "frames": min((f.frames for f in figures.values()), default=0),
        "agreement": round(min(agreements), 4) if agreements else None,
        "distance": max(distances) if distances else None,
    }


def run_shadow(
    name: str,
    version: str,
    model_path: Path,
    servers: list[ShadowServer],
    rule: ShadowRule,
    progress: Progress,
    stop: threading.Event,
    *,
    build_timeout_s: float = 120.0,
    poll_s: float = 0.1,
) -> dict[str, dict[str, Any]]:
    """Run the stage on ``servers`` (non-empty); figures per pipeline when the candidate
    passes, ``CommandFailed`` when it does not."""
    progress(STAGE, 0.0, {"frames": 0, "agreement": None, "distance": None})
    handles: dict[str, ShadowHandle] = {}
    final: dict[str, ShadowFigures] = {}
    try:
        futures = [(s.pipeline, s.start_shadow(version, model_path)) for s in servers]
        for pipeline, future in futures:
            try:
                handles[pipeline] = future.result(build_timeout_s)
            except FutureTimeout:
                raise CommandFailed(
                    ReplyCode.VALIDATION_FAILED,
                    f"{name} {version}: building it beside the serving version on "
                    f"pipeline {pipeline} timed out",
                ) from None
            except Exception as exc:
                raise CommandFailed(
                    ReplyCode.VALIDATION_FAILED, f"{name} {version}: {exc}"
                ) from None
        deadline = time.monotonic() + rule.timeout_s
        while True:
            now: dict[str, ShadowFigures] = {}
            for pipeline, handle in handles.items():
                figures = final.get(pipeline) or handle.figures()
                if pipeline not in final and figures.frames >= rule.frames:
                    handle.stop()  # enough here: stop costing this pipeline CPU
                    figures = final[pipeline] = handle.figures()
                now[pipeline] = figures
            least = min(f.frames for f in now.values())
            progress(STAGE, min(100.0, 100.0 * least / rule.frames), progress_data(now))
            if len(final) == len(handles):
                break
            if time.monotonic() >= deadline:
                data = {p: f.as_data() for p, f in now.items()}
                raise CommandFailed(
                    ReplyCode.SHADOW_REJECTED,
                    f"{name} {version}: fewer than {rule.frames} frames compared within "
                    f"{rule.timeout_s:g}s of shadow evaluation ({_frames_text(now)}); "
                    "a version nobody saw work is not swapped in",
                    {"model": name, "version": version, "shadow": data},
                )
            if stop.wait(poll_s):
                raise CommandFailed(
                    ReplyCode.INTERRUPTED,
                    f"{name} {version}: the agent stopped during shadow evaluation; "
                    "the version was not kept",
                    {"model": name, "version": version},
                )
    finally:
        for handle in handles.values():
            handle.stop()
    data = {p: f.as_data() for p, f in final.items()}
    problems = [f"{why} on pipeline {p}" for p, f in final.items() if (why := rule.problem(f))]
    if problems:
        raise CommandFailed(
            ReplyCode.SHADOW_REJECTED,
            f"{name} {version} refused by shadow evaluation: {'; '.join(problems)} "
            f"({_frames_text(final)} compared with the serving version)",
            {"model": name, "version": version, "shadow": data},
        )
    logger.info("model %s %s passed shadow evaluation: %s", name, version, data)
    return data


def _frames_text(figures: dict[str, ShadowFigures]) -> str:
    return ", ".join(f"{f.frames} frames on {p}" for p, f in figures.items())
