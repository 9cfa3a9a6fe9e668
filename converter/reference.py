"""The manifest's model-health blocks: reference statistics and golden samples.

Both come from the converted model as the agent's loader runs it (``load_model``, the
default runtime), never from the float model: the reference describes what a device
will see from *this* file, and the golden outputs are what a correct runtime computes.

- ``reference_of``: from the dequantised outputs on the validation set (what
  ``evaluate.run_tflite`` returns), by task, with ``agent.models.health``'s builders.
- ``golden_of``: a few inputs, quantised as the device quantises frames and stored
  reduced to fit ``GOLDEN_BUDGET``; the model runs on the *restored* input (what the
  device will feed) and its raw output tensors (codes, not dequantised) are kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.models.anchors_boxes import anchors_candidate_scores
from agent.models.anchors_grid import anchor_outputs, generate_anchors, input_size
from agent.models.decoder_spec import AnchorsDecoder, Decoder, YoloDecoder
from agent.models.detect_layout import yolo_candidate_scores
from agent.models.golden import (
    GOLDEN_BUDGET,
    MAX_OUTPUT_ELEMENTS,
    MAX_SAMPLES,
    TOLERANCE_FLOAT,
    TOLERANCE_STEPS,
    Golden,
    GoldenSample,
    GoldenTensor,
    pack_input,
    pack_output,
)
from agent.models.health import (
    DETECT_THRESHOLD,
    DetectReference,
    Reference,
    SegmentReference,
    classify_reference,
    detect_order,
    detect_reference,
    raw_reference,
    segment_reference,
)
from agent.models.manifest import Preprocess, StateLink, frame_input_index
from agent.models.runtime import LoadedModel, LoaderError, TensorInfo, fit_inputs, load_model
from agent.models.segment_map import frame_class_map, segment_layout
from converter.datasets import load_dataset
from converter.errors import ConverterError
from converter.evaluate import run_tflite
from converter.reference_probe import survives

logger = logging.getLogger(__name__)

DEFAULT_GOLDEN = 4
# Largest accepted difference of float outputs, relative to the output's largest
# magnitude, by quantisation. Measured between LiteRT, tflite-runtime and reference
# kernels (docs/model-health.md): int8 models' float outputs up to 1.7% (their int8
# steps), dynamic-range models up to 0.8%, float32/float16 models below 1e-6. About
# twice that, rounded up; float models get 1e-3, since other CPUs (NEON, FMA) sum in
# other orders and a wrong kernel is off by far more.
FLOAT_TOLERANCE = {
    "int8": 0.04,
    "int8-float-io": 0.04,
    "dynamic": 0.02,
    "float16": 1e-3,
    "none": 1e-3,
}


def reference_of(
    task: str,
    outputs: Sequence[TensorInfo],
    values: list[np.ndarray],
    decoder: Decoder | None = None,
    *,
    inputs: Sequence[TensorInfo] = (),
    layout: str = "NHWC",
    labels: Sequence[str] | None = None,
) -> Reference | None:
    """Reference statistics from every output's dequantised values, ``[n, ...]`` each.
    A pose is described as detections are (its points' scores, points per frame over
    the threshold); a segmentation by its class areas, on the cells the agent samples.
    The anchors decoder needs the model's ``inputs`` (its grid is of the input size),
    their ``layout`` and the ``labels`` (a score column per class)."""
    n = int(values[0].shape[0])
    if task == "segment":
        return Reference(samples=n, segment=_segment_reference(outputs, values[0]))
    if task == "keypoints":
        scores = values[0].reshape(n, -1, 3)[:, :, 2]
        points = np.arange(scores.shape[1])
        return Reference(samples=n, detect=detect_reference([points] * n, list(scores)))
    if task in ("classify", "keyword"):
        return Reference(samples=n, classify=classify_reference(values[0]))
    if task == "detect" and isinstance(decoder, YoloDecoder):
        found = [yolo_candidate_scores(decoder.type, v, DETECT_THRESHOLD) for v in values[0]]
        return Reference(
            samples=n,
            detect=detect_reference([f[1] for f in found], [f[0] for f in found]),
        )
    if task == "detect" and isinstance(decoder, AnchorsDecoder):
        return Reference(
            samples=n, detect=_anchors_reference(decoder, inputs, layout, labels, outputs, values)
        )
    if task == "detect":
        try:
            _, ic, isc, icount = detect_order(outputs)
        except ValueError as exc:
            raise ConverterError(f"--task detect: {exc}") from None
        counts = values[icount].reshape(n, -1)[:, 0]
        classes = values[ic].reshape(n, -1)
        scores = values[isc].reshape(n, -1)
        # Past a frame's count the op leaves padding; only its first ``count`` rows are boxes.
        kept = [max(0, min(int(c), scores.shape[1])) for c in counts]
        return Reference(
            samples=n,
            detect=detect_reference(
                [classes[i, : kept[i]] for i in range(n)],
                [scores[i, : kept[i]] for i in range(n)],
            ),
        )
    return Reference(samples=n, raw=raw_reference(values))


def _segment_reference(outputs: Sequence[TensorInfo], values: np.ndarray) -> SegmentReference:
    layout = segment_layout(outputs[0].shape)
    if layout is None:
        raise ConverterError(
            f"--task segment: output {outputs[0].name!r} has shape {list(outputs[0].shape)}, "
            "expected [1, H, W, C] (class scores) or [1, H, W] (class indices)"
        )
    maps = [frame_class_map(v, layout) for v in values]
    return segment_reference(maps, classes=layout[2])


def _anchors_reference(
    spec: AnchorsDecoder,
    inputs: Sequence[TensorInfo],
    layout: str,
    labels: Sequence[str] | None,
    outputs: Sequence[TensorInfo],
    values: list[np.ndarray],
) -> DetectReference:
    if not inputs:
        raise ConverterError("--val: the anchors decoder's reference needs the model's input")
    try:
        width, height = input_size(inputs[0].shape, layout)
        pairs = anchor_outputs(spec, outputs, width, height, len(labels) if labels else None)
    except ValueError as exc:
        raise ConverterError(f"--decoder anchors: {exc}") from None
    anchors = generate_anchors(spec, width, height).astype(np.float64)
    found = [
        anchors_candidate_scores(spec, pairs, anchors, [v[i] for v in values])
        for i in range(int(values[0].shape[0]))
    ]
    # The agent counts the merged boxes from min_score on; so does the reference.
    return detect_reference(
        [f[1] for f in found],
        [f[0] for f in found],
        threshold=max(spec.min_score, DETECT_THRESHOLD),
    )


def _kept_output_bytes(t: TensorInfo) -> int:
    size = math.prod(t.shape)
    stride = max(1, math.ceil(size / MAX_OUTPUT_ELEMENTS))
    return len(range(0, size, stride)) * np.dtype(t.dtype).itemsize


def spread(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``n`` samples (class folders load in order)."""
    return sorted({int(i) for i in np.rint(np.linspace(0, n - 1, min(count, n)))})


def check_golden_count(count: int) -> int:
    if not 0 <= count <= MAX_SAMPLES:
        raise ConverterError(f"--golden must be 0..{MAX_SAMPLES}, got {count}")
    return count


def golden_of(
    model: bytes,
    loaded: LoadedModel,
    x: np.ndarray,
    count: int = DEFAULT_GOLDEN,
    *,
    quantization: str,
    budget: int = GOLDEN_BUDGET,
    state: Sequence[StateLink] | None = None,
) -> Golden | None:
    """Golden samples from model-ready float samples ``x`` (``[n, ...]``) of ``model``
    (loaded as ``loaded``); None when ``count`` is 0 or nothing fits ``budget``. A
    streaming model's state inputs (``state``) are stored at zero: its state at start.

    A sample is kept only when the runtime's reference kernels agree with ``loaded`` on
    it within half the tolerance: an input on a knife-edge (two scores that swap places
    in a detector's sorted boxes, a score at the count threshold) would make a correct
    device fail, so another sample of ``x`` is taken instead.
    """
    if check_golden_count(count) == 0 or len(x) == 0:
        return None
    frame = _frame_input(loaded, state, "golden samples (use --golden 0)")
    tolerance = Tolerance(
        steps=TOLERANCE_STEPS, relative=FLOAT_TOLERANCE.get(quantization, TOLERANCE_FLOAT)
    )
    second = reference_kernels(loaded, model)
    out_bytes = sum(_kept_output_bytes(t) for t in loaded.outputs)
    for n in range(min(count, len(x)), 0, -1):
        room = budget // n - out_bytes
        if room <= 0:
            continue
        first = spread(len(x), n)
        candidates = first + [i for i in spread(len(x), 4 * n) if i not in first]
        samples: list[tuple[GoldenSample, int]] = []
        for i in candidates:
            sample = _sample(loaded, second, x[i : i + 1], room, tolerance, frame)
            if sample is not None:
                samples.append(sample)
            if len(samples) == n:
                break
        if samples and sum(size for _, size in samples) <= budget:
            return Golden(
                runtime=str(loaded.runtime),
                tolerance_steps=tolerance.steps,
                tolerance_float=tolerance.relative,
                samples=[s for s, _ in samples],
            )
    return None


@dataclass(frozen=True)
class Tolerance:
    steps: float
    relative: float


def reference_kernels(loaded: LoadedModel, model: bytes) -> Any | None:
    """A second interpreter of ``model`` on the runtime's reference kernels (other
    arithmetic than the optimised ones, as another CPU's would be), or None."""
    module = loaded.runtime.module
    kinds = getattr(module, "OpResolverType", None) or getattr(
        getattr(module, "experimental", None), "OpResolverType", None
    )
    if kinds is None:
        return None
    shapes = [t.shape for t in loaded.inputs]
    # Tried in a child first: on some models they abort the process (SIGABRT).
    failure = survives(model, loaded.runtime.name, shapes)
    if failure is not None:
        logger.warning(
            "golden samples screened on the optimised kernels only: the reference kernels "
            "of %s cannot be used, %s",
            loaded.runtime,
            failure,
        )
        return None
    try:
        interpreter = module.Interpreter(
            model_content=model, num_threads=1, experimental_op_resolver_type=kinds.BUILTIN_REF
        )
        # At the shapes of the first (a dynamic input was resized to --input-shape).
        fit_inputs(interpreter, shapes)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError, TypeError, LoaderError) as exc:
        logger.info("no reference kernels to screen golden samples with: %s", exc)
        return None
    return interpreter


def _frame_input(loaded: LoadedModel, state: Sequence[StateLink] | None, what: str) -> int:
    """The input data goes to: the only one, or the only one that is not state."""
    stateful = {link.input for link in state or ()}
    if len(loaded.inputs) - len(stateful) != 1:
        raise ConverterError(
            f"{what} need a model with one input besides its state inputs (--state); this "
            f"one has {len(loaded.inputs)} inputs, {len(stateful)} of them state"
        )
    return frame_input_index([t.name for t in loaded.inputs], list(state or ()))


def _sample(
    loaded: LoadedModel,
    second: Any | None,
    x: np.ndarray,
    room: int,
    tolerance: Tolerance,
    frame: int = 0,
) -> tuple[GoldenSample, int] | None:
    """One sample and the raw bytes it keeps; None when ``second`` disagrees on it.
    Inputs other than ``frame`` (a streaming model's state) are fed real zeros."""
    fed = []
    for k, t in enumerate(loaded.inputs):
        value = x.reshape(t.shape) if k == frame else np.zeros(t.shape, np.float32)
        fed.append(pack_input(t.quantize(value), room))
    interpreter = loaded.interpreter
    for t, (_, full) in zip(loaded.inputs, fed, strict=True):
        interpreter.set_tensor(t.index, full)
    interpreter.invoke()
    raw = [interpreter.get_tensor(t.index) for t in loaded.outputs]
    if second is not None:
        for t, (_, full) in zip(loaded.inputs, fed, strict=True):
            second.set_tensor(t.index, full)
        second.invoke()
        for t, value in zip(loaded.outputs, raw, strict=True):
            if not _close(t, value, second.get_tensor(t.index), tolerance):
                return None
    outputs = [pack_output(value) for value in raw]
    stored = [s for s, _ in fed]
    return GoldenSample(inputs=stored, outputs=outputs), _stored_bytes([*stored, *outputs])


def _close(t: TensorInfo, a: np.ndarray, b: np.ndarray, tolerance: Tolerance) -> bool:
    """Within half the tolerance: a margin for the device's kernels, which differ again."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if diff.size == 0:
        return True
    if t.quantized and np.dtype(t.dtype).kind in "iu":
        return bool(diff.max() <= tolerance.steps / 2)
    magnitude = max(float(np.abs(a).max()), 1e-6)
    return bool(np.isfinite(diff).all() and diff.max() / magnitude <= tolerance.relative / 2)


def _stored_bytes(tensors: Sequence[GoldenTensor]) -> int:
    # base64 holds 3 bytes in 4 characters, padded to a multiple of 4.
    return sum(len(t.data) // 4 * 3 - t.data[-2:].count("=") for t in tensors)


def health_from_data(
    model: bytes,
    task: str,
    preprocess: Preprocess,
    data: Path,
    golden: int = DEFAULT_GOLDEN,
    samples: int | None = None,
    *,
    quantization: str,
    decoder: Decoder | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    state: Sequence[StateLink] | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[Reference | None, Golden | None]:
    """``edge-convert bundle --val``: reference and golden samples of a finished .tflite
    from a data set (at most ``samples`` of it), preprocessed as the manifest says.

    A streaming model (``state``) gets golden samples (its state inputs at zero) but no
    reference: a data set's windows are not a stream, and outputs from zero state
    would not describe what the device sees, so output drift stays off for it."""
    check_golden_count(golden)
    if samples is not None and samples < 1:
        raise ConverterError("--samples must be at least 1")
    try:
        loaded = load_model(model, input_shapes=input_shapes)
    except LoaderError as exc:
        raise ConverterError(str(exc)) from None
    frame = _frame_input(loaded, state, "--val")
    dataset = load_dataset(data, loaded.inputs[frame].shape, preprocess)
    if samples is not None:
        dataset = dataset.subset(samples)
    golden_block = golden_of(
        model, loaded, dataset.x, golden, quantization=quantization, state=state
    )
    if state:
        logger.info("no reference statistics for a streaming model (--state): drift stays off")
        return None, golden_block
    values = run_tflite(loaded, dataset.x)
    reference = reference_of(
        task,
        loaded.outputs,
        values,
        decoder,
        inputs=loaded.inputs,
        layout=preprocess.layout,
        labels=labels,
    )
    return reference, golden_block
