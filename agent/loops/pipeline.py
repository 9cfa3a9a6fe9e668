"""A pipeline: source -> capture thread -> slot or queue -> inference worker -> results
thread -> outbox.

Three threads overlap: while the worker invokes the model on one frame, the capture
thread decodes and pre-processes the next and the results thread post-processes and
publishes the previous one, so the worker's own per-frame work is little more than
the invoke, and the model's speed is the pipeline's limit.

Processing (agent.loops.processing) is built per model version from that version's
manifest and the interpreter's own tensor details, so a hot-swap brings its own: the
worker builds it, and the capture thread pre-processes with whatever processing the
worker last built. A frame prepared for another version (or before any) is
pre-processed again on the worker, so a swap never feeds a model a tensor shaped for
its predecessor. Each result carries the processing that prepared its frame and the
frame's ``FrameContext`` (transform, frame number, capture and audio time), and the
results thread post-processes it with that: one call, whatever the post-processor. The
processing also carries its version's reference statistics, against which the results
thread keeps the drift window (agent.loops.drift): a few appends per frame, binned
only when read. With ``pipelines[].capture`` on, the frame as the source gave it rides
with its result (a reference), and the results thread offers the least confident to
the pipeline's ``FrameCapture`` (agent.loops.capture).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import PipelineConfig
from agent.loops.capture import FrameCapture
from agent.loops.drift import DriftMonitor
from agent.loops.frames import Frame, FrameQueue, LatestFrameSlot
from agent.loops.postprocess import FrameContext, Output, PublishPolicy
from agent.loops.preprocess import ImagePreprocessor, limit_opencv_threads
from agent.loops.processing import (
    PrepareAhead,
    Prepared,
    Processing,
    build_processing,
    preprocess_frame,
)
from agent.loops.sources import CaptureThread, Source, create_source
from agent.loops.stats import LatencyWindow, RateMeter
from agent.loops.stream_state import StreamState
from agent.loops.worker import InferenceResult, InferenceWorker, ServedModel
from agent.models.manifest import Manifest
from agent.models.runtime import LoadedModel
from agent.protocol import PipelineState, PipelineTelemetry, Result, StageLatency
from agent.threads import SUPPORT_NICE, Watch, lower_priority

logger = logging.getLogger(__name__)

ManifestLookup = Callable[[str, str], Manifest | None]
ResultSink = Callable[[Result], object]
STAGES = ("wait", "preprocess", "invoke", "postprocess", "handover")
# Enough to ride out jitter between capture and worker; the producer blocks beyond it.
# Deeper only adds latency and memory (a 640x480 frame is 0.9 MB).
QUEUE_FRAMES = 8
# Results waiting for post-processing; past this the worker waits (back-pressure).
RESULTS_QUEUE = 64


@dataclass(frozen=True, slots=True)
class _ResultContext:
    """What travels with a result from the worker to the results thread: the processing
    that prepared its frame, the frame's context for its post-processor, and ``source``,
    the frame as the source gave it, kept (a reference) only while capture or a shadow
    evaluation wants it."""

    processing: Processing
    frame: FrameContext
    pre_ms: float
    source: Frame | None = None


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
        captures: FrameCapture | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.device = device
        self._manifests = manifests
        self._publish = publish
        self.source = source if source is not None else create_source(config.source)
        # A live source too may queue (``queue: fifo``): a streaming model must see
        # every window, and a slot that keeps the latest drops some.
        live = config.queue == "latest"
        self.frames: LatestFrameSlot | FrameQueue = (
            LatestFrameSlot() if live else FrameQueue(QUEUE_FRAMES)
        )
        self.capture = CaptureThread(config.name, self.source, self._prepare_ahead())
        self.worker = InferenceWorker(
            config.name,
            config.model,
            self.frames,
            self._hand_on,
            load=load,
            prepare=self._prepare,
            finish=self._finish,
        )
        self.policy = PublishPolicy(
            config.publish.mode, config.publish.max_per_s, config.publish.score_delta
        )
        self.drift = DriftMonitor(config.name, config.drift)
        # Frames worth labelling (pipelines[].capture); None when capture is off.
        self.captures = captures
        # The processing for the version being served: built by the worker thread,
        # read by the capture thread (prepare ahead), replaced by ``update``.
        self._processing: Processing | None = None
        # A streaming model's state, for the loaded model it belongs to: the worker's alone.
        self._stream: StreamState | None = None
        self._results: queue.Queue[InferenceResult] = queue.Queue(RESULTS_QUEUE)
        self._results_stop = threading.Event()
        self._results_thread: threading.Thread | None = None
        self.results_heartbeat = time.monotonic()
        # A capture thread still stuck in a read after a restart: the new one starts
        # only when it ends, so that one source never has two readers.
        self._capture_after: CaptureThread | None = None
        self._capture_lock = threading.Lock()
        # Set while a shadow evaluation runs (agent.loops.shadow): the results thread
        # offers it each source frame with the serving version's output for it.
        self.shadow_tap: Callable[[Frame, Output, Callable[[], Result]], object] | None = None
        # Written by the results thread only.
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
        self._stream = None  # a streaming model starts from zero state
        self._results_stop.clear()
        self._start_results()
        if self.captures is not None:
            self.captures.start()
        self.worker.start()
        self.capture.start()

    def _start_results(self) -> None:
        self.results_heartbeat = time.monotonic()
        self._results_thread = threading.Thread(
            target=self._publish_results, name=f"results-{self.name}", daemon=True
        )
        self._results_thread.start()

    def restart_results(self) -> None:
        """A fresh results thread after the last one died; queued results wait for it."""
        if not self._results_stop.is_set():
            self._start_results()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop capture, worker and results thread, all within ``timeout`` s: a thread
        stuck past its share (a hung read or invoke) is left to end with the process."""
        deadline = time.monotonic() + timeout

        def share(fraction: float) -> float:
            return max(0.05, (deadline - time.monotonic()) * fraction)

        with self._capture_lock:
            self._capture_after = None
        self.capture.stop(share(1 / 3))
        self.worker.stop(share(1 / 2))
        # After the worker: every result it produced is still published.
        self._results_stop.set()
        if self._results_thread is not None:
            self._results_thread.join(share(1.0))
            self._results_thread = None
        if self.captures is not None:
            self.captures.stop(share(1.0))

    @property
    def busy(self) -> bool:
        """Frames or results still waiting in the pipeline (for a caller draining it)."""
        return len(self.frames) > 0 or self._results.unfinished_tasks > 0

    def update(self, config: PipelineConfig) -> None:
        """Take live changes (threshold, top_k, publish policy) from a new config."""
        self.config = config
        self.policy = PublishPolicy(
            config.publish.mode, config.publish.max_per_s, config.publish.score_delta
        )
        self.drift.configure(config.drift)
        # The worker rebuilds its processing (threshold, top_k) on its next frame.
        self._processing = None

    def restart_source(self) -> None:
        with self._capture_lock:
            old = self._capture_after or self.capture
            old.stop()
            self.capture = CaptureThread(self.name, self.source, self._prepare_ahead())
            if old.alive:
                # Stuck in a driver read: a second thread must not read the same source.
                # ``poll`` starts the new one when the old read returns and its thread ends.
                self._capture_after = old
                self.capture.last_error = "waiting for a hung read of the source to end"
                logger.warning("pipeline %s: source restart waits for a hung read", self.name)
            else:
                self._capture_after = None
                self.capture.start()

    def poll(self) -> None:
        """The service's tick: start a restarted source once its hung reader is gone."""
        # Never waits: a restart holds the lock while it waits for the old thread.
        if not self._capture_lock.acquire(blocking=False):
            return
        try:
            old = self._capture_after
            if old is not None and not old.alive:
                self._capture_after = None
                self.capture.start()
        finally:
            self._capture_lock.release()

    def watches(self) -> list[Watch]:
        """This pipeline's threads, for the supervisor."""

        def capture_thread() -> threading.Thread | None:
            # Not while the restarted one waits for its hung predecessor.
            return None if self._capture_after is not None else self.capture.thread

        def capture_heartbeat() -> float | None:
            # Opening or waiting to reconnect has no heartbeat to keep (open may block).
            return self.capture.heartbeat if self.capture.state == "open" else None

        def results_thread() -> threading.Thread | None:
            return None if self._results_stop.is_set() else self._results_thread

        watches = [
            Watch(
                f"worker-{self.name}",
                self.worker.thread,
                lambda: self.worker.heartbeat,
                self.worker.restart_thread,
            ),
            Watch(f"capture-{self.name}", capture_thread, capture_heartbeat, self.restart_source),
            Watch(
                f"results-{self.name}",
                results_thread,
                lambda: self.results_heartbeat,
                self.restart_results,
            ),
        ]
        captures = self.captures
        if captures is not None:
            watches.append(
                Watch(
                    f"captures-{self.name}",
                    captures.thread,
                    captures.heartbeat,
                    captures.restart_thread,
                )
            )
        return watches

    # --------------------------------------------------------------- worker hooks

    def _prepare_ahead(self) -> PrepareAhead:
        """A capture thread's sink: pre-processes with the processing the worker last built."""
        return PrepareAhead(lambda: self._processing, self.frames)

    def _processing_for(self, model: ServedModel) -> Processing:
        proc = self._processing
        if proc is not None and proc.version == model.version:
            return proc
        manifest = self._manifests(model.name, model.version)
        if manifest is None:
            raise RuntimeError(f"no manifest for {model.name} {model.version}")
        proc = build_processing(model.version, manifest, model.loaded, self.config)
        pre = proc.pre
        # An MJPG source may now decode at no more than the model needs.
        self.source.target_size = (
            (pre.width, pre.height) if isinstance(pre, ImagePreprocessor) else None
        )
        self._processing = proc
        return proc

    def _stream_of(self, model: ServedModel, proc: Processing) -> StreamState | None:
        """The state of the loaded model being served: a new (zero) one for a new load."""
        if proc.state is None:
            return None
        stream = self._stream
        if stream is None or stream.loaded is not model.loaded:
            stream = StreamState(model.loaded, proc.state)
            self._stream = stream
            if isinstance(self.frames, LatestFrameSlot):
                logger.warning(
                    "pipeline %s: %s %s keeps state between windows but the queue is "
                    "'latest': dropped windows break its stream (set queue: fifo)",
                    self.name,
                    model.name,
                    model.version,
                )
        return stream

    def _prepare(self, model: ServedModel, frame: Frame) -> _ResultContext:
        proc = self._processing_for(model)
        stream = self._stream_of(model, proc)
        if stream is not None:
            stream.feed()
        data = frame.data
        keep_source = self.captures is not None or self.shadow_tap is not None
        if isinstance(data, Prepared):
            if data.processing is proc:
                model.loaded.interpreter.set_tensor(proc.input_index, data.tensor)
                source = Frame(frame.seq, frame.ts, data.raw, frame.meta) if keep_source else None
                return _ResultContext(proc, data.frame, data.ms, source)
            frame = Frame(frame.seq, frame.ts, data.raw, frame.meta)
        start = time.perf_counter()
        tensor, context = preprocess_frame(proc, frame)
        model.loaded.interpreter.set_tensor(proc.input_index, tensor)
        ms = (time.perf_counter() - start) * 1000
        return _ResultContext(proc, context, ms, frame if keep_source else None)

    def _finish(self, model: ServedModel, frame: Frame) -> list[np.ndarray]:
        interpreter = model.loaded.interpreter
        stream = self._stream
        if stream is None or stream.loaded is not model.loaded:
            # Raw output tensors (copies) go back to the worker, which checks them for
            # NaN/inf (probation) before the results thread post-processes them.
            return [interpreter.get_tensor(o.index) for o in model.loaded.outputs]
        stream.keep()
        carried = stream.outputs
        outputs = model.loaded.outputs
        return [interpreter.get_tensor(o.index) for o in outputs if o.index not in carried]

    def _hand_on(self, result: InferenceResult) -> None:
        """The worker's sink: queue the result for the results thread. Waits when that
        thread is far behind, so results are never dropped and memory stays bounded."""
        while True:
            try:
                self._results.put(result, timeout=0.1)
                return
            except queue.Full:
                if self._results_stop.is_set():
                    return

    # --------------------------------------------------------------- results thread

    def _publish_results(self) -> None:
        lower_priority(SUPPORT_NICE)
        while True:
            self.results_heartbeat = time.monotonic()
            try:
                result = self._results.get(timeout=0.1)
            except queue.Empty:
                if self._results_stop.is_set():
                    return
                continue
            try:
                self._on_result(result)
            except Exception as exc:  # a bad output or a bad hook must not end the thread
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    logger.warning(
                        "pipeline %s: cannot publish the result of frame %d (%d errors): %s",
                        self.name,
                        result.seq,
                        self.errors,
                        exc,
                    )
            finally:
                self._results.task_done()

    def _on_result(self, result: InferenceResult) -> None:
        context: _ResultContext = result.context
        start = time.perf_counter()
        output = context.processing.post(result.outputs, context.frame)
        post_ms = (time.perf_counter() - start) * 1000
        lat = self.latency
        to_done_ms = (result.done - result.ts) * 1000
        lat["wait"].add(max(0.0, to_done_ms - result.invoke_ms - context.pre_ms))
        lat["preprocess"].add(context.pre_ms)
        lat["invoke"].add(result.invoke_ms)
        lat["postprocess"].add(post_ms)
        # Every result counts, published or not: drift is about what the model sees.
        self.drift.add(result.version, context.processing.reference, output)
        latency_ms = context.pre_ms + result.invoke_ms + post_ms
        tap = self.shadow_tap
        if tap is not None and context.source is not None:
            # A 1-deep hand-over: never waits. The result is built only for a capture.
            tap(context.source, output, lambda: self._result(result, output, latency_ms))
        if self.captures is not None and context.source is not None:
            self.captures.consider(
                context.source, output, lambda: self._result(result, output, latency_ms)
            )
        if output.silent or not self.policy.should_publish(output):
            self.suppressed += 1
            return
        self._publish(self._result(result, output, latency_ms))
        # From the worker's hand-over to the outbox's, less the post-processing.
        handover_ms = (time.time() - result.done) * 1000 - post_ms
        lat["handover"].add(max(0.0, handover_ms))
        self.results_out += 1

    def _result(self, result: InferenceResult, output: Output, latency_ms: float) -> Result:
        return Result(
            device=self.device,
            pipeline=self.name,
            seq=0,  # the outbox assigns the per-device sequence number
            ts=result.ts,
            frame=result.seq,
            model=result.model,
            version=result.version,
            latency_ms=round(latency_ms, 3),
            classes=output.classes,
            detections=output.detections,
            keypoints=output.keypoints,
            segmentation=output.segmentation,
            raw=output.raw,
        )

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
            drift=self.drift.warning if version is not None else None,
        )

    def check_drift(self) -> str | None:
        """Bin the drift window now (the service's tick); the warning, if any."""
        self.drift.evaluate(self.worker.serving_version())
        return self.drift.warning

    def telemetry(self, now: float, reader: str = "telemetry") -> PipelineTelemetry:
        """The pipeline's figures; ``fps`` is over the time since ``reader`` last asked."""
        stages = {}
        for stage, window in self.latency.items():
            p50, p95, p99 = window.percentiles(50, 95, 99)
            if p50 is not None:
                stages[stage] = StageLatency(p50=p50, p95=p95, p99=p99)
        invoke = stages.get("invoke")
        version = self.worker.serving_version()
        stats = self.worker.stats(version or "")
        drift = self.drift.evaluate(version)
        return PipelineTelemetry(
            model=self.config.model,
            version=version,
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
            errors=(stats.errors if stats else 0) + self.errors,
            stages=stages,
            drift=drift.distance if drift else None,
            confidence=drift.confidence if drift else None,
            captured=self.captures.captured if self.captures is not None else 0,
            capture_errors=self.captures.errors if self.captures is not None else 0,
        )
