"""A pipeline: source -> capture thread -> slot or queue -> inference worker -> outbox.

The capture thread and the worker overlap: while the worker invokes the model on one
frame, the capture thread decodes and pre-processes the next, so the worker's own
per-frame work is little more than the invoke. Processing is built per model version
from that version's manifest and the interpreter's own tensor details, so a hot-swap
brings its own: the worker builds it, and the capture thread pre-processes with
whatever processing the worker last built. A frame prepared for another version
(or before any) is pre-processed again on the worker, so a swap never feeds a model
a tensor shaped for its predecessor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import PipelineConfig
from agent.loops.frames import Frame, FrameQueue, LatestFrameSlot
from agent.loops.postprocess import Classifier, Detector, Output, PublishPolicy, RawOutputs
from agent.loops.preprocess import (
    ImagePreprocessor,
    Transform,
    limit_opencv_threads,
    make_preprocessor,
)
from agent.loops.sources import CaptureThread, Source, create_source
from agent.loops.sources.base import FrameSink
from agent.loops.stats import LatencyWindow, RateMeter
from agent.loops.worker import InferenceResult, InferenceWorker, ServedModel
from agent.models.manifest import Manifest
from agent.models.runtime import LoadedModel
from agent.protocol import PipelineState, PipelineTelemetry, Result, StageLatency

logger = logging.getLogger(__name__)

ManifestLookup = Callable[[str, str], Manifest | None]
ResultSink = Callable[[Result], object]
STAGES = ("wait", "preprocess", "invoke", "postprocess", "handover")
# Enough to ride out jitter between capture and worker; the producer blocks beyond it.
# Deeper only adds latency and memory (a 640x480 frame is 0.9 MB).
QUEUE_FRAMES = 8


@dataclass
class _Processing:
    version: str
    pre: Callable[[np.ndarray], tuple[np.ndarray, Transform | None]]
    post: Callable[..., Output]
    input_index: int


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A frame pre-processed on the capture thread, and by which processing; ``raw``
    is the frame as the source gave it, in case the worker must do it again."""

    raw: Any
    processing: _Processing
    tensor: np.ndarray
    transform: Transform | None
    ms: float


class _PrepareAhead:
    """The capture thread's sink: pre-processes each frame with the processing the
    worker last built, then hands it to the slot or queue. A frame that fails here is
    passed on as it is; the worker tries again and counts the error."""

    def __init__(self, pipeline: Pipeline, frames: FrameSink) -> None:
        self._pipeline = pipeline
        self._frames = frames

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        proc = self._pipeline._processing
        if proc is not None:
            start = time.perf_counter()
            try:
                tensor, transform = proc.pre(frame.data)
            except Exception:  # reported by the worker, which tries again
                pass
            else:
                ms = (time.perf_counter() - start) * 1000
                prepared = _Prepared(frame.data, proc, tensor, transform, ms)
                frame = Frame(frame.seq, frame.ts, prepared, frame.meta)
        return self._frames.put(frame, stop)


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        *,
        device: str,
        manifests: ManifestLookup,
        publish: ResultSink,
        load: Callable[[Path], LoadedModel],
        source: Source | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.name = config.name
        self.device = device
        self._manifests = manifests
        self._publish = publish
        self._clock = clock
        self.source = source if source is not None else create_source(config.source)
        live = self.source.live or config.queue == "latest"
        self.frames: LatestFrameSlot | FrameQueue = (
            LatestFrameSlot() if live else FrameQueue(QUEUE_FRAMES)
        )
        self.capture = CaptureThread(config.name, self.source, _PrepareAhead(self, self.frames))
        self.worker = InferenceWorker(
            config.name,
            config.model,
            self.frames,
            self._on_result,
            load=load,
            prepare=self._prepare,
            finish=self._finish,
        )
        self.policy = PublishPolicy(
            config.publish.mode, config.publish.max_per_s, config.publish.score_delta
        )
        # Worker-thread state: the processing for the version being served, and what
        # the current frame's hooks hand to each other.
        self._processing: _Processing | None = None
        self._transform: Transform | None = None
        self._t_pre = 0.0
        self._t_post = 0.0
        self.latency = {stage: LatencyWindow() for stage in STAGES}
        self.results_out = 0
        self.suppressed = 0
        self.errors = 0
        # One meter per reader (telemetry messages, Prometheus scrapes): reading a
        # rate restarts its window, so readers must not share one.
        self._fps: dict[str, RateMeter] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        limit_opencv_threads()
        self.worker.start()
        self.capture.start()

    def stop(self) -> None:
        self.capture.stop()
        self.worker.stop()

    def update(self, config: PipelineConfig) -> None:
        """Take live changes (threshold, top_k, publish policy) from a new config."""
        self.config = config
        self.policy = PublishPolicy(
            config.publish.mode, config.publish.max_per_s, config.publish.score_delta
        )
        # The worker rebuilds its processing (threshold, top_k) on its next frame.
        self._processing = None

    def restart_source(self) -> None:
        self.capture.stop()
        self.capture = CaptureThread(self.name, self.source, _PrepareAhead(self, self.frames))
        self.capture.start()

    # --------------------------------------------------------------- worker hooks

    def _processing_for(self, model: ServedModel) -> _Processing:
        proc = self._processing
        if proc is not None and proc.version == model.version:
            return proc
        manifest = self._manifests(model.name, model.version)
        if manifest is None:
            raise RuntimeError(f"no manifest for {model.name} {model.version}")
        tensor = model.loaded.inputs[0]
        pre = make_preprocessor(tensor, manifest.preprocess, self.config.resize)
        outputs = model.loaded.outputs
        labels = manifest.labels
        post: Callable[..., Output]
        if manifest.task == "classify":
            post = Classifier(outputs, labels, self.config.top_k, self.config.threshold)
        elif manifest.task == "detect":
            size = (pre.width, pre.height) if isinstance(pre, ImagePreprocessor) else (1, 1)
            post = Detector(outputs, labels, size, self.config.threshold)
        else:
            post = RawOutputs(outputs)
        proc = _Processing(model.version, pre, post, tensor.index)
        self._processing = proc
        return proc

    def _prepare(self, model: ServedModel, frame: Frame) -> None:
        proc = self._processing_for(model)
        data = frame.data
        if isinstance(data, _Prepared):
            if data.processing is proc:
                model.loaded.interpreter.set_tensor(proc.input_index, data.tensor)
                self._transform, self._t_pre = data.transform, data.ms
                return
            data = data.raw
        start = time.perf_counter()
        tensor, self._transform = proc.pre(data)
        model.loaded.interpreter.set_tensor(proc.input_index, tensor)
        self._t_pre = (time.perf_counter() - start) * 1000

    def _finish(self, model: ServedModel, frame: Frame) -> list[np.ndarray]:
        interpreter = model.loaded.interpreter
        # Raw output tensors go back to the worker, which checks them for NaN/inf
        # (probation) before the sink post-processes them.
        return [interpreter.get_tensor(o.index) for o in model.loaded.outputs]

    def _on_result(self, result: InferenceResult) -> None:
        proc = self._processing
        if proc is None:
            return
        start = time.perf_counter()
        output = proc.post(result.outputs, self._transform)
        post_ms = (time.perf_counter() - start) * 1000
        lat = self.latency
        total_ms = (self._clock() - result.ts) * 1000
        lat["wait"].add(max(0.0, total_ms - result.invoke_ms - self._t_pre - post_ms))
        lat["preprocess"].add(self._t_pre)
        lat["invoke"].add(result.invoke_ms)
        lat["postprocess"].add(post_ms)
        if not self.policy.should_publish(output):
            self.suppressed += 1
            return
        start = time.perf_counter()
        self._publish(
            Result(
                device=self.device,
                pipeline=self.name,
                seq=0,  # the outbox assigns the per-device sequence number
                ts=result.ts,
                frame=result.seq,
                model=result.model,
                version=result.version,
                latency_ms=round(self._t_pre + result.invoke_ms + post_ms, 3),
                classes=output.classes,
                detections=output.detections,
                raw=output.raw,
            )
        )
        lat["handover"].add((time.perf_counter() - start) * 1000)
        self.results_out += 1

    # ------------------------------------------------------------------ reporting

    def heartbeat_age(self, now: float) -> float:
        """Seconds since the worker, or an open source, last made progress (watchdog)."""
        age = now - self.worker.heartbeat
        if self.capture.state == "open":
            age = max(age, now - self.capture.heartbeat)
        return age

    def state(self) -> PipelineState:
        version = self.worker.serving_version()
        if version is None:
            status, message = "degraded", f"no {self.config.model} model to serve"
        elif self.capture.state not in ("open", "opening"):
            status, message = "degraded", f"source {self.capture.state}: {self.capture.last_error}"
        else:
            status, message = "running", None
        return PipelineState(
            name=self.name,
            model=f"{self.config.model}:{version}" if version else self.config.model,
            status=status,
            message=message,
        )

    def telemetry(self, now: float, reader: str = "telemetry") -> PipelineTelemetry:
        """The pipeline's figures; ``fps`` is over the time since ``reader`` last asked."""
        stages = {}
        for stage, window in self.latency.items():
            p50, p95, p99 = window.percentiles(50, 95, 99)
            if p50 is not None:
                stages[stage] = StageLatency(p50=p50, p95=p95, p99=p99)
        invoke = stages.get("invoke")
        stats = self.worker.stats(self.worker.serving_version() or "")
        return PipelineTelemetry(
            model=self.config.model,
            version=self.worker.serving_version(),
            fps=self._fps.setdefault(reader, RateMeter()).rate(
                self.results_out + self.suppressed, now
            ),
            invoke_ms_p50=invoke.p50 if invoke else None,
            invoke_ms_p95=invoke.p95 if invoke else None,
            frames_in=self.capture.frames,
            results_out=self.results_out,
            dropped=self.frames.dropped,
            source_state=self.capture.state,
            source_failures=self.capture.failures,
            errors=stats.errors if stats else 0,
            stages=stages,
        )
