"""The inference worker: one thread that owns one interpreter and turns frames into results.

Nothing else touches the interpreter. A swap is a request (``swap`` returns a Future):
a helper thread builds, allocates and warms up the new interpreter while the worker
keeps serving, then the worker switches it in between two inferences and hands the
old one back to the helper to be released. Each frame is served whole by the model
that is current when its inference starts, so a swap neither drops nor repeats a
frame, and every result names the version that made it.

Per frame: ``prepare`` (frame -> input tensors; what it returns travels with the
result as its ``context``), invoke, ``finish`` (output tensors -> outputs), then the
sink. Invoke errors and non-finite outputs are counted per version (the probation
figures) and never stop the thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.loops.frames import Frame, FrameInput
from agent.loops.stats import LatencyWindow
from agent.models.runtime import LoadedModel, load_model
from agent.models.serving import ServingStats, SwapDone
from agent.models.validate import Requirements
from agent.threads import BACKGROUND_NICE, lower_priority

logger = logging.getLogger(__name__)

_LATENCY_WINDOW = 1024
_KEEP_STATS = 4


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    loaded: LoadedModel


@dataclass(frozen=True, slots=True)
class InferenceResult:
    pipeline: str
    model: str
    version: str
    seq: int
    ts: float
    invoke_ms: float
    outputs: Any
    context: Any = None
    #: Unix time when the outputs were read back, for the latency of each stage.
    done: float = 0.0


Prepare = Callable[[ServedModel, Frame], Any]
Finish = Callable[[ServedModel, Frame], Any]
Sink = Callable[[InferenceResult], None]
Loader = Callable[[Path], LoadedModel]


def feed_tensor(model: ServedModel, frame: Frame) -> None:
    """Default prepare: ``frame.data`` is the input tensor (or a list, one per input)."""
    interpreter = model.loaded.interpreter
    data = frame.data
    if isinstance(data, list | tuple):
        for info, tensor in zip(model.loaded.inputs, data, strict=True):
            interpreter.set_tensor(info.index, tensor)
    else:
        interpreter.set_tensor(model.loaded.inputs[0].index, data)


def dequantised_outputs(model: ServedModel, frame: Frame) -> list[np.ndarray]:
    """Default finish: every output as float32, dequantised when the model is quantised."""
    interpreter = model.loaded.interpreter
    return [info.dequantize(interpreter.get_tensor(info.index)) for info in model.loaded.outputs]


def _all_finite(outputs: Any) -> bool:
    if isinstance(outputs, np.ndarray):
        return outputs.dtype.kind not in "fc" or bool(np.isfinite(outputs).all())
    if isinstance(outputs, list | tuple):
        return all(_all_finite(o) for o in outputs)
    if isinstance(outputs, float):
        return math.isfinite(outputs)
    return True


class _VersionStats:
    """Written by the worker thread only; read under the worker's stats lock."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.since = time.monotonic()
        self.invokes = 0
        self.errors = 0
        self.nonfinite = 0
        self.last_error: str | None = None
        self._latency = LatencyWindow(_LATENCY_WINDOW)

    def record(self, ms: float) -> None:
        self._latency.add(ms)
        self.invokes += 1

    def snapshot(self) -> ServingStats:
        window = self._latency.values()
        n = window.size
        return ServingStats(
            version=self.version,
            invokes=self.invokes,
            errors=self.errors,
            nonfinite=self.nonfinite,
            p50_ms=float(np.percentile(window, 50)) if n else None,
            p95_ms=float(np.percentile(window, 95)) if n else None,
            serving_s=time.monotonic() - self.since,
            last_error=self.last_error,
        )


@dataclass
class _Handoff:
    model: ServedModel | None
    future: Future[SwapDone]
    build_ms: float


def _warm_up(loaded: LoadedModel, invokes: int) -> None:
    for _ in range(invokes):
        for info in loaded.inputs:
            loaded.interpreter.set_tensor(info.index, np.zeros(info.shape, np.dtype(info.dtype)))
        loaded.interpreter.invoke()


def _release(model: ServedModel | None) -> None:
    """Run on the helper thread: dropping the last reference frees the interpreter there."""
    del model


class InferenceWorker:
    """Serves ``model_name`` on ``pipeline``: frames from ``frames``, results to ``sink``."""

    def __init__(
        self,
        pipeline: str,
        model_name: str,
        frames: FrameInput,
        sink: Sink,
        *,
        load: Loader = load_model,
        prepare: Prepare = feed_tensor,
        finish: Finish = dequantised_outputs,
        requirements: Requirements | None = None,
        warmup_invokes: int = 2,
        poll_s: float = 0.05,
    ) -> None:
        self._pipeline = pipeline
        self._model_name = model_name
        self._frames = frames
        self._sink = sink
        self._load = load
        self._prepare = prepare
        self._finish = finish
        self._requirements = requirements
        self._warmup = warmup_invokes
        self._poll_s = poll_s
        self._model: ServedModel | None = None  # the worker thread's alone
        self._handoff: queue.SimpleQueue[_Handoff] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self._stats: dict[str, _VersionStats] = {}
        self._current: _VersionStats | None = None
        self._serving: str | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self.sink_errors = 0
        self.heartbeat = time.monotonic()

    # --------------------------------------------------------------- ModelServer

    @property
    def pipeline(self) -> str:
        return self._pipeline

    @property
    def model_name(self) -> str:
        return self._model_name

    def serving_version(self) -> str | None:
        return self._serving

    def requirements(self) -> Requirements | None:
        return self._requirements

    def stats(self, version: str) -> ServingStats | None:
        with self._stats_lock:
            s = self._stats.get(version)
            return s.snapshot() if s is not None else None

    def swap(self, version: str | None, model_path: Path | None) -> Future[SwapDone]:
        future: Future[SwapDone] = Future()
        future.set_running_or_notify_cancel()
        if self._stop.is_set():
            future.set_exception(RuntimeError(f"worker {self._pipeline} is stopped"))
            return future
        if (version is None) != (model_path is None):
            future.set_exception(ValueError("swap needs both a version and a model path, or none"))
            return future
        self._executor().submit(self._build, version, model_path, future)
        return future

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"worker-{self._pipeline}", daemon=True
        )
        self._thread.start()

    def thread(self) -> threading.Thread | None:
        """The worker thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def restart_thread(self) -> None:
        """A fresh worker thread after the last one died; it serves the same model."""
        if not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name=f"worker-{self._pipeline}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; waits up to ``timeout`` s for it and as long again for a
        model build or release still on the helper (which then ends in the background)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._helper is not None:
            # One helper thread, in order: this runs once everything before it has.
            drained = self._helper.submit(lambda: None)
            self._helper.shutdown(wait=False)
            with contextlib.suppress(TimeoutError):
                drained.result(timeout)
        self._fail_pending()
        self._model = None
        self._serving = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._helper is None:
            # One helper: builds happen in request order, and release the old models.
            self._helper = ThreadPoolExecutor(1, thread_name_prefix=f"swap-{self._pipeline}")
        return self._helper

    # --------------------------------------------------------------- helper thread

    def _build(self, version: str | None, path: Path | None, future: Future[SwapDone]) -> None:
        # On a busy CPU, building the next model yields to the worker serving this one.
        lower_priority(BACKGROUND_NICE)
        start = time.perf_counter()
        model: ServedModel | None = None
        if version is not None and path is not None:
            try:
                loaded = self._load(path)
                _warm_up(loaded, self._warmup)
            except Exception as exc:
                text = str(exc).strip().splitlines()
                future.set_exception(
                    RuntimeError(
                        f"cannot build {self._model_name} {version} on {self._pipeline}: "
                        f"{text[0] if text else type(exc).__name__}"
                    )
                )
                return
            model = ServedModel(self._model_name, version, loaded)
        self._handoff.put(_Handoff(model, future, (time.perf_counter() - start) * 1000))
        self._wake.set()
        if self._stop.is_set():
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                pending = self._handoff.get_nowait()
            except queue.Empty:
                return
            if not pending.future.done():
                pending.future.set_exception(RuntimeError(f"worker {self._pipeline} stopped"))

    # --------------------------------------------------------------- worker thread

    def _switch_pending(self) -> None:
        if self._handoff.empty():  # the per-frame case: no exception raised and caught
            return
        while True:
            try:
                pending = self._handoff.get_nowait()
            except queue.Empty:
                return
            old = self._model
            self._model = pending.model
            new_version = pending.model.version if pending.model else None
            with self._stats_lock:
                if new_version is not None:
                    self._current = _VersionStats(new_version)
                    self._stats[new_version] = self._current
                    for stale in list(self._stats)[:-_KEEP_STATS]:
                        del self._stats[stale]
                else:
                    self._current = None
            self._serving = new_version
            pending.future.set_result(
                SwapDone(
                    self._pipeline,
                    new_version,
                    old.version if old else None,
                    pending.build_ms,
                )
            )
            if old is not None and self._helper is not None:
                self._helper.submit(_release, old)
            del old

    def _run(self) -> None:
        logger.debug("worker %s started", self._pipeline)
        while not self._stop.is_set():
            # Read by the watchdog: an invoke that hangs stops this clock.
            self.heartbeat = time.monotonic()
            try:
                self._switch_pending()
                if self._model is None:
                    self._wake.wait(self._poll_s)
                    self._wake.clear()
                    continue
                frame = self._frames.get(self._poll_s)
                if frame is not None:
                    self._infer(frame)
            except Exception:
                # Never lose the worker to a bad frame or a bad hook.
                logger.exception("worker %s: unexpected error", self._pipeline)
                self._stop.wait(self._poll_s)
        logger.debug("worker %s stopped", self._pipeline)

    def _infer(self, frame: Frame) -> None:
        # A swap may land while this frame waits; the model read here serves it to the end.
        self._switch_pending()
        model = self._model
        stats = self._current
        if model is None or stats is None:
            return
        try:
            context = self._prepare(model, frame)
            start = time.perf_counter()
            model.loaded.interpreter.invoke()
            invoke_ms = (time.perf_counter() - start) * 1000
            outputs = self._finish(model, frame)
        except Exception as exc:
            with self._stats_lock:
                stats.errors += 1
                stats.last_error = str(exc).strip()[:200] or type(exc).__name__
            if stats.errors == 1 or stats.errors % 100 == 0:
                logger.warning(
                    "worker %s: %s %s failed on frame %d (%d errors): %s",
                    self._pipeline,
                    model.name,
                    model.version,
                    frame.seq,
                    stats.errors,
                    stats.last_error,
                )
            return
        finite = _all_finite(outputs)
        with self._stats_lock:
            stats.record(invoke_ms)
            if not finite:
                stats.nonfinite += 1
        if not finite:
            return
        try:
            self._sink(
                InferenceResult(
                    self._pipeline,
                    model.name,
                    model.version,
                    frame.seq,
                    frame.ts,
                    invoke_ms,
                    outputs,
                    context,
                    time.time(),
                )
            )
        except Exception:
            self.sink_errors += 1
            if self.sink_errors == 1 or self.sink_errors % 100 == 0:
                logger.exception("worker %s: result sink failed", self._pipeline)
