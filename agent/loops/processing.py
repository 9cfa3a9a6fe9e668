"""Pre- and post-processing of one model version, built from its manifest, the
interpreter's own tensor details and the pipeline's settings.

The pipeline builds one per version it serves (a hot-swap brings its own), and so does
a shadow evaluation for its candidate. ``preprocess_frame`` is the one place a frame
becomes an input tensor and the ``FrameContext`` its post-processor will be given;
``PrepareAhead`` does it on the capture thread, with whatever processing the worker
last built, so that the worker's own per-frame work is little more than the invoke.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import PipelineConfig
from agent.loops.decoders import make_detector
from agent.loops.frames import Frame
from agent.loops.keypoints import KeypointsDecoder
from agent.loops.keyword import KeywordSpotter
from agent.loops.postprocess import Classifier, FrameContext, Postprocessor, RawOutputs
from agent.loops.preprocess import ImagePreprocessor, Transform, make_preprocessor
from agent.loops.segment import Segmenter
from agent.loops.sources.audio import AUDIO_TIME
from agent.loops.sources.base import FrameSink
from agent.loops.sources.jpeg import SOURCE_SIZE
from agent.models.health import Reference
from agent.models.manifest import Manifest, StateLink
from agent.models.runtime import LoadedModel


@dataclass
class Processing:
    version: str
    pre: Callable[[np.ndarray], tuple[np.ndarray, Transform | None]]
    post: Postprocessor
    input_index: int
    reference: Reference | None = None
    # Tensor indexes of the outputs ``post`` reads, in order: all but the state outputs.
    outputs: tuple[int, ...] = ()
    # A streaming model's state links (manifest ``state``), else None.
    state: list[StateLink] | None = None


def preprocess_frame(proc: Processing, frame: Frame) -> tuple[np.ndarray, FrameContext]:
    """The model's input tensor for ``frame``, and the context ``proc.post`` takes."""
    tensor, transform = proc.pre(frame.data)
    source_size = frame.meta.get(SOURCE_SIZE)
    if transform is not None and source_size is not None:
        # The source decoded a reduced copy: boxes still go back to its full size.
        transform = transform.for_source(*source_size)
    return tensor, FrameContext(frame.seq, frame.ts, transform, frame.meta.get(AUDIO_TIME))


def build_processing(
    version: str, manifest: Manifest, loaded: LoadedModel, config: PipelineConfig
) -> Processing:
    """Pre- and post-processing of one model version, from its manifest, the
    interpreter's tensors and the pipeline's settings."""
    tensor = loaded.inputs[manifest.frame_input]
    pre = make_preprocessor(tensor, manifest.preprocess, config.resize)
    carried = {link.output for link in manifest.state or ()}
    outputs = [o for o in loaded.outputs if o.name not in carried]
    labels = manifest.labels
    post: Postprocessor
    size = (pre.width, pre.height) if isinstance(pre, ImagePreprocessor) else (1, 1)
    if manifest.task == "classify":
        post = Classifier(outputs, labels, config.top_k, config.threshold)
    elif manifest.task == "detect":
        post = make_detector(manifest, outputs, labels, size, config.threshold)
    elif manifest.task == "keyword":
        post = KeywordSpotter(outputs, labels, config.keyword, config.threshold)
    elif manifest.task == "keypoints":
        post = KeypointsDecoder(outputs, labels, size, config.threshold)
    elif manifest.task == "segment":
        post = Segmenter(outputs, labels, size, config.segment)
    else:
        post = RawOutputs(outputs, config.raw.max_values)
    return Processing(
        version,
        pre,
        post,
        tensor.index,
        manifest.reference,
        tuple(o.index for o in outputs),
        manifest.state,
    )


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame pre-processed on the capture thread, and by which processing; ``raw``
    is the frame as the source gave it, in case the worker must do it again."""

    raw: Any
    processing: Processing
    tensor: np.ndarray
    frame: FrameContext
    ms: float


class PrepareAhead:
    """The capture thread's sink: pre-processes each frame with ``current()``, the
    processing the worker last built (None before any), then hands it to the slot or
    queue as a ``Prepared``. A frame that fails here is passed on as it is; the worker
    tries again and counts the error."""

    def __init__(self, current: Callable[[], Processing | None], frames: FrameSink) -> None:
        self._current = current
        self._frames = frames

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        proc = self._current()
        if proc is not None:
            start = time.perf_counter()
            try:
                tensor, context = preprocess_frame(proc, frame)
            except Exception:  # reported by the worker, which tries again
                pass
            else:
                ms = (time.perf_counter() - start) * 1000
                prepared = Prepared(frame.data, proc, tensor, context, ms)
                frame = Frame(frame.seq, frame.ts, prepared, frame.meta)
        return self._frames.put(frame, stop)
