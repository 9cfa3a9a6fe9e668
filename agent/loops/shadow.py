"""Shadow evaluation: a candidate version beside the serving one, on the same live frames.

While the lifecycle weighs a new version (``agent.models.shadow_stage``), every pipeline
serving the previous version runs the candidate on a sample of its frames. The
pipeline's results thread offers each source frame, with the serving version's
post-processed output for it, through a 1-deep hand-over: an offer made while one
waits is dropped, so the results thread never waits and nothing queues up. The
candidate has its own interpreter (built by the worker's loader on the evaluator's
own thread after lowering its priority, so that the runtime's threads inherit it) and
its own pre- and post-processing, built from its own manifest: a wrong mean/std or
colour, or shuffled labels, shows as disagreement. Nothing it computes is published.

Agreement per frame (``agreement``): classify, the same top-1 class (by label when
both name it); detect, the F1 of boxes matched at IoU 0.5 with the same class key
(label, else index); keypoints, the fraction of points within a tenth of the pose's
size (PCK@0.1); segment, the mean IoU of the reduced class maps; raw, the cosine
similarity of the outputs. A frame the candidate
fails on (an error or NaN/inf outputs) counts as a disagreement. Distance: the
candidate's outputs in an ``OutputWindow`` against its manifest's reference.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from agent.config import PipelineConfig
from agent.loops.capture import top_confidence
from agent.loops.frames import Frame
from agent.loops.keypoints import pose_agreement
from agent.loops.postprocess import Output, summarise
from agent.loops.processing import Processing, build_processing, preprocess_frame
from agent.loops.segment import map_agreement
from agent.loops.stream_state import StreamState
from agent.models.health import OutputWindow, box_f1, cosine, same_class
from agent.models.manifest import Manifest
from agent.models.runtime import LoadedModel
from agent.models.serving import ShadowFigures, ShadowHandle
from agent.protocol import Detection, Result
from agent.threads import BACKGROUND_NICE, lower_priority

logger = logging.getLogger(__name__)

Loader = Callable[[Path], LoadedModel]
# The candidate's outputs kept for its distance; far more than a decision needs.
WINDOW_FRAMES = 1000
# The evaluator's own Python work (pre- and post-processing, agreement, summaries) holds
# the GIL, which the serving pipeline's threads need whatever their priority (and a
# low-priority thread preempted while holding it stalls them all). After each frame it
# rests so that this work takes at most this share of the time; invoke, which releases
# the GIL, does not count (the scheduler and its priority bound that).
GIL_SHARE = 0.05


# A frame on which the candidate agreed less than this is offered to the pipeline's
# frame capture (when on) as worth labelling.
DISAGREED = 0.5
Disagreement = Callable[[Frame, Result, float | None, dict[str, Any]], object]


def _answer(output: Output) -> dict[str, Any]:
    lists: tuple[tuple[str, Sequence[BaseModel] | None], ...] = (
        ("classes", output.classes),
        ("detections", output.detections),
        ("keypoints", output.keypoints),
    )
    answer: dict[str, Any] = {
        key: [item.model_dump(exclude_none=True) for item in items]
        for key, items in lists
        if items is not None
    }
    if output.segmentation is not None:
        answer["segmentation"] = output.segmentation.model_dump(exclude_none=True)
    return answer


# --------------------------------------------------------------------- agreement


def _keyed(detections: list[Detection]) -> list[tuple[str, tuple[float, float, float, float]]]:
    return [(d.label if d.label is not None else str(d.index), d.box) for d in detections]


def agreement(active: Output, candidate: Output) -> float:
    """How far the candidate's answer for one frame agrees with the serving version's,
    0..1. Both without an answer (nothing above the pipeline's threshold) agree."""
    if active.silent or candidate.silent:
        # A keyword window that fired nothing on one side: did both hear the same class?
        heard, other = active.top1, candidate.top1
        return float(heard is not None and other is not None and heard[0] == other[0])
    if active.classes is not None or candidate.classes is not None:
        a, c = active.classes or [], candidate.classes or []
        if not a or not c:
            return float(not a and not c)
        return float(same_class(a[0].index, a[0].label, c[0].index, c[0].label))
    if active.detections is not None or candidate.detections is not None:
        return box_f1(_keyed(active.detections or []), _keyed(candidate.detections or []))
    if active.keypoints is not None or candidate.keypoints is not None:
        return pose_agreement(active.keypoints or [], candidate.keypoints or [])
    if active.class_map is not None and candidate.class_map is not None:
        return map_agreement(active.class_map, candidate.class_map)
    if active.tensors is not None and candidate.tensors is not None:
        return max(0.0, cosine(active.tensors, candidate.tensors))
    return 0.0


def _finite(values: list[np.ndarray]) -> bool:
    return all(v.dtype.kind not in "fc" or bool(np.isfinite(v).all()) for v in values)


# --------------------------------------------------------------------- evaluator


@dataclass(frozen=True, slots=True)
class _Offer:
    frame: Frame
    active: Output
    # The serving version's result for the frame, built only if a capture wants it.
    result: Callable[[], Result] | None = None


class ShadowEvaluator:
    """Runs ``version`` of the pipeline's model beside the serving one (a ShadowHandle).

    ``offer`` is the results thread's; ``figures`` and ``stop`` the lifecycle's; the
    evaluator's thread owns the candidate's interpreter. The output window is shared
    under the lock: the thread appends a frame's summary, ``figures`` bins it (at the
    lifecycle's pace, not per frame).
    """

    def __init__(
        self,
        pipeline: str,
        version: str,
        model_path: Path,
        manifest: Manifest,
        config: PipelineConfig,
        load: Loader,
        *,
        on_stop: Callable[[ShadowEvaluator], None] | None = None,
        on_disagree: Disagreement | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self.pipeline = pipeline
        self.version = version
        self._model_path = model_path
        self._manifest = manifest
        self._config = config
        self._load = load
        self._on_stop = on_stop
        self._on_disagree = on_disagree
        self._poll_s = poll_s
        self._slot: queue.Queue[_Offer] = queue.Queue(1)
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the figures below: written by the thread, read by any
        self._frames = 0
        self._agreed = 0.0
        self._errors = 0
        self._last_error: str | None = None
        reference = manifest.reference
        self._window = OutputWindow(reference, WINDOW_FRAMES, min_frames=1) if reference else None
        self._summarised = 0  # frames added to the window (it keeps the last WINDOW_FRAMES)
        self._distance: tuple[int, float | None] = (0, None)  # (at _summarised, distance)
        # The results thread's counters.
        self.offered = 0
        self.dropped = 0

    def start(self) -> Future[ShadowHandle]:
        """Build the candidate on the evaluator's thread; the future says when it runs."""
        future: Future[ShadowHandle] = Future()
        future.set_running_or_notify_cancel()
        self._thread = threading.Thread(
            target=self._run, args=(future,), name=f"shadow-{self.pipeline}", daemon=True
        )
        self._thread.start()
        return future

    # ------------------------------------------------------------ results thread

    def offer(
        self, frame: Frame, active: Output, result: Callable[[], Result] | None = None
    ) -> bool:
        """Hand one frame over unless one already waits; never blocks."""
        if not self._ready or self._stop.is_set():
            return False
        try:
            self._slot.put_nowait(_Offer(frame, active, result))
        except queue.Full:
            self.dropped += 1
            return False
        self.offered += 1
        return True

    # ------------------------------------------------------------ lifecycle

    def figures(self) -> ShadowFigures:
        with self._lock:
            n = self._frames
            window = self._window
            if window is not None and self._summarised != self._distance[0]:
                try:
                    self._distance = (self._summarised, window.figures().distance)
                except Exception as exc:  # a reference that does not fit its outputs
                    self._no_distance(exc)
            return ShadowFigures(
                frames=n,
                agreement=self._agreed / n if n else None,
                distance=self._distance[1],
                errors=self._errors,
                last_error=self._last_error,
            )

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._on_stop is not None:
            self._on_stop(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------ evaluator thread

    def _run(self, future: Future[ShadowHandle]) -> None:
        # Before the interpreter exists: its runtime's threads inherit this priority.
        lower_priority(BACKGROUND_NICE)
        try:
            loaded = self._load(self._model_path)
            proc = build_processing(self.version, self._manifest, loaded, self._config)
            # A streaming candidate carries its state over the frames it is offered.
            stream = StreamState(loaded, proc.state) if proc.state else None
        except Exception as exc:
            text = str(exc).strip().splitlines()
            future.set_exception(
                RuntimeError(
                    f"cannot build {self._manifest.name} {self.version} beside the serving "
                    f"version on {self.pipeline}: {text[0] if text else type(exc).__name__}"
                )
            )
            self.stop()
            return
        self._ready = True
        future.set_result(self)
        logger.debug("shadow %s %s started on %s", self._manifest.name, self.version, self.pipeline)
        while not self._stop.is_set():
            try:
                offer = self._slot.get(timeout=self._poll_s)
            except queue.Empty:
                continue
            busy_s = self._evaluate(loaded, proc, offer, stream)
            if busy_s > 0:
                self._stop.wait(busy_s * (1 / GIL_SHARE - 1))
        logger.debug(
            "shadow %s on %s ended: %d compared, %d offered, %d dropped",
            self.version,
            self.pipeline,
            self._frames,
            self.offered,
            self.dropped,
        )

    def _no_distance(self, exc: Exception) -> None:
        """Under the lock: drop the window whose reference does not fit the outputs."""
        logger.warning("shadow %s on %s: no distance: %s", self.version, self.pipeline, exc)
        self._window = None
        self._distance = (0, None)

    def _evaluate(
        self, loaded: LoadedModel, proc: Processing, offer: _Offer, stream: StreamState | None
    ) -> float:
        """Compare one frame; the seconds it held the GIL (all but the invoke)."""
        start = time.perf_counter()
        invoke_s = 0.0
        error: str | None = None
        score = 0.0
        values: list[np.ndarray] | None = None
        summary: Output | None = None
        try:
            tensor, context = preprocess_frame(proc, offer.frame)
            interpreter = loaded.interpreter
            interpreter.set_tensor(proc.input_index, tensor)
            if stream is not None:
                stream.feed()
            invoke_start = time.perf_counter()
            interpreter.invoke()
            invoke_s = time.perf_counter() - invoke_start
            if stream is not None:
                stream.keep()
            values = [interpreter.get_tensor(i) for i in proc.outputs]
            if not _finite(values):
                raise ValueError("NaN/inf outputs")
            candidate = proc.post(values, context)
            score = agreement(offer.active, candidate)
            summary = candidate
            if score < DISAGREED and self._on_disagree is not None and offer.result is not None:
                details = {
                    "candidate": self.version,
                    "agreement": round(score, 4),
                    "candidate_result": _answer(candidate),
                }
                self._on_disagree(
                    offer.frame, offer.result(), top_confidence(offer.active), details
                )
        except Exception as exc:
            error = str(exc).strip()[:200] or type(exc).__name__
        with self._lock:
            self._frames += 1
            self._agreed += score
            if error is not None:
                self._errors += 1
                self._last_error = error
            elif self._window is not None and summary is not None:
                try:
                    summarise(self._window, summary)
                    self._summarised += 1
                except Exception as exc:  # a reference that does not fit its outputs
                    self._no_distance(exc)
        return time.perf_counter() - start - invoke_s
