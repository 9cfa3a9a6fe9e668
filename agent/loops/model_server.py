"""A pipeline as the model lifecycle sees it: a ``ShadowServer`` (agent.models.serving).

Swaps and serving figures are the inference worker's; shadow evaluation of a candidate
needs the pipeline too (its frames, its settings, the manifests), so this object, not
the worker, is what the service hands to the lifecycle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from agent.loops.pipeline import Pipeline
from agent.loops.shadow import Loader, ShadowEvaluator
from agent.models.manifest import Manifest
from agent.models.serving import ServingStats, ShadowHandle, SwapDone
from agent.models.validate import Requirements

ManifestLookup = Callable[[str, str], Manifest | None]


class PipelineServer:
    """Serves ``pipeline``'s model through its worker; runs at most one shadow at a time."""

    def __init__(self, pipeline: Pipeline, load: Loader, manifests: ManifestLookup) -> None:
        self._pipeline = pipeline
        self._load = load
        self._manifests = manifests
        self._lock = threading.Lock()
        self._shadow: ShadowEvaluator | None = None

    @property
    def pipeline(self) -> str:
        return self._pipeline.name

    @property
    def model_name(self) -> str:
        return self._pipeline.worker.model_name

    def serving_version(self) -> str | None:
        return self._pipeline.worker.serving_version()

    def swap(self, version: str | None, model_path: Path | None) -> Future[SwapDone]:
        return self._pipeline.worker.swap(version, model_path)

    def stats(self, version: str) -> ServingStats | None:
        return self._pipeline.worker.stats(version)

    def requirements(self) -> Requirements | None:
        return self._pipeline.worker.requirements()

    def start_shadow(self, version: str, model_path: Path) -> Future[ShadowHandle]:
        manifest = self._manifests(self.model_name, version)
        serving = self.serving_version()
        if manifest is None or serving is None:
            failed: Future[ShadowHandle] = Future()
            failed.set_running_or_notify_cancel()
            why = f"no manifest for {version}" if manifest is None else "it serves no version"
            failed.set_exception(RuntimeError(f"no shadow evaluation on {self.pipeline}: {why}"))
            return failed
        evaluator = ShadowEvaluator(
            self.pipeline,
            version,
            model_path,
            manifest,
            self._pipeline.config,
            self._load,
            on_stop=self._detach,
            on_disagree=(
                captures.offer_disagreement
                if (captures := self._pipeline.captures) is not None
                else None
            ),
        )
        with self._lock:
            previous, self._shadow = self._shadow, evaluator
            self._pipeline.shadow_tap = evaluator.offer
        if previous is not None:
            previous.stop()
        return evaluator.start()

    def _detach(self, evaluator: ShadowEvaluator) -> None:
        with self._lock:
            if self._shadow is evaluator:
                self._shadow = None
                self._pipeline.shadow_tap = None
