"""Whether a model's outputs fit what its manifest says it is (task and decoder).

Checked at deploy time, after the validation child has confirmed the outputs are the
manifest's, and before the model swaps in: a YOLO head whose class count differs from
its labels, or an anchor decoder whose anchor count is not the model's, is refused
with ``incompatible`` and one line naming the tensor and the shape expected, instead
of serving garbage or failing at every frame. The converter runs the same checks
before it writes a bundle. Pure: shapes only, no runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.models.anchors_grid import anchor_outputs, input_size
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.detect_layout import yolo_expected, yolo_layout
from agent.models.health import detect_order
from agent.models.manifest import Manifest, TensorSpec


class OutputMismatch(ValueError):
    """The outputs do not fit the task or decoder; one line naming tensor and shape."""


def describe(t: TensorSpec) -> str:
    return f"output {t.name!r} {t.dtype}{list(t.shape)}"


def _ssd(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
    try:
        detect_order(outputs)
    except ValueError as exc:
        shapes = ", ".join(describe(t) for t in outputs)
        raise OutputMismatch(f"{exc} (outputs: {shapes})") from None


def _keyword(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
    """One score per keyword: the first output [1, classes] (or [classes]), one label each."""
    t = outputs[0]
    classes = t.shape[-1] if t.shape else 0
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[0] != 1) or classes < 2:
        raise OutputMismatch(
            f"keyword: {describe(t)} is not class scores: expected [1, classes], 2 classes or more"
        )
    labels = manifest.labels
    if labels is not None and len(labels) != classes:
        raise OutputMismatch(
            f"keyword: {describe(t)} scores {classes} classes but the manifest has "
            f"{len(labels)} labels"
        )


def _anchors(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
    spec = manifest.decoder
    if not isinstance(spec, AnchorsDecoder):  # pragma: no cover - keyed by the decoder type
        raise OutputMismatch("decoder anchors without its spec")
    try:
        width, height = input_size(manifest.inputs[0].shape, manifest.preprocess.layout)
        classes = len(manifest.labels) if manifest.labels else None
        anchor_outputs(spec, outputs, width, height, classes)
    except ValueError as exc:
        raise OutputMismatch(str(exc)) from None


def _yolo(kind: str) -> Callable[[Manifest, Sequence[TensorSpec]], None]:
    def check(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
        labels = manifest.labels
        want = yolo_expected(kind, len(labels) if labels else "C")
        if len(outputs) != 1:
            shapes = ", ".join(describe(t) for t in outputs)
            raise OutputMismatch(f"{kind} needs one output {want}, this model has {shapes}")
        layout = yolo_layout(kind, outputs[0].shape)
        if layout is None:
            raise OutputMismatch(f"{describe(outputs[0])} is not a {kind} head {want}")
        if labels and layout[1] != len(labels):
            raise OutputMismatch(
                f"{describe(outputs[0])} has {layout[1]} classes but there are "
                f"{len(labels)} labels: expected {want}"
            )

    return check


def _keypoints(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
    t = outputs[0]
    dims = list(t.shape)
    if not (len(dims) == 4 and dims[:2] == [1, 1] and dims[3] == 3 and dims[2] > 0):
        raise OutputMismatch(
            f"task keypoints: {describe(t)} is not [1, 1, K, 3] (y, x, score per point)"
        )
    labels = manifest.labels
    if labels is not None and len(labels) != dims[2]:
        raise OutputMismatch(
            f"task keypoints: {describe(t)} has {dims[2]} points but the manifest names "
            f"{len(labels)}"
        )


def _segment(manifest: Manifest, outputs: Sequence[TensorSpec]) -> None:
    t = outputs[0]
    dims = list(t.shape)
    if len(dims) not in (3, 4) or dims[0] != 1 or min(dims[1:]) < 1:
        raise OutputMismatch(
            f"task segment: {describe(t)} is not [1, H, W, C] (class scores) "
            "or [1, H, W] (class indices)"
        )
    labels = manifest.labels
    classes = dims[3] if len(dims) == 4 else 1
    if classes > 1 and labels is not None and len(labels) != classes:
        raise OutputMismatch(
            f"task segment: {describe(t)} scores {classes} classes but the manifest names "
            f"{len(labels)}"
        )


def check_state(manifest: Manifest) -> None:
    """A streaming model's state output must fit the input it is fed back to."""
    inputs = {t.name: t for t in manifest.inputs}
    outputs = {t.name: t for t in manifest.outputs}
    for link in manifest.state or ():
        i, o = inputs[link.input], outputs[link.output]
        if list(i.shape) != list(o.shape) or i.dtype != o.dtype:
            raise OutputMismatch(
                f"state: {describe(o)} cannot feed input {i.name!r} {i.dtype}{list(i.shape)}: "
                "expected the same shape and dtype"
            )


def task_outputs(manifest: Manifest) -> list[TensorSpec]:
    """The outputs the task reads: all but a streaming model's state outputs, in order."""
    carried = {link.output for link in manifest.state or ()}
    return [t for t in manifest.outputs if t.name not in carried]


# Key: the task, or "detect:<decoder type>". A task without an entry takes any outputs.
CHECKS: dict[str, Callable[[Manifest, Sequence[TensorSpec]], None]] = {
    "detect:ssd": _ssd,
    "detect:yolov5": _yolo("yolov5"),
    "detect:yolov8": _yolo("yolov8"),
    "keyword": _keyword,
    "detect:anchors": _anchors,
    "keypoints": _keypoints,
    "segment": _segment,
}


def check_outputs(manifest: Manifest) -> None:
    """Raise ``OutputMismatch`` when the manifest's outputs do not fit its task (or
    its state)."""
    check_state(manifest)
    key: str = manifest.task
    if key == "detect":
        key = f"detect:{manifest.decoder.type if manifest.decoder else 'ssd'}"
    check = CHECKS.get(key)
    if check is not None:
        check(manifest, task_outputs(manifest))
