"""How large a pipeline's results will be, from the model's manifest and the pipeline's
settings (``edge-agent check``): a raw output past ``raw.max_values`` goes out as a
summary only, and a result of kilobytes at every frame fills a cellular link and the
outbox. Pure: shapes and settings, no runtime."""

from __future__ import annotations

import math

from agent.config import PipelineConfig
from agent.models.decoder_spec import AnchorsDecoder, YoloDecoder
from agent.models.health import detect_order
from agent.models.manifest import Manifest
from agent.models.segment_map import segment_layout

# About what a result may weigh before it is worth a warning.
MAX_RESULT_BYTES = 2048
# A result's fixed fields (device, pipeline, model, version, times) as JSON.
_ENVELOPE_BYTES = 220
# One ClassScore / Detection as JSON, without its label.
_CLASS_BYTES = 40
_DETECTION_BYTES = 95
# One Keypoint without its name ({"x":..,"y":..,"score":..}) and what a name adds.
_KEYPOINT_BYTES = 45
_NAME_BYTES = 10
# A detection's "keypoints":[] around its points.
_KEYPOINTS_FIELD_BYTES = 15
# segment: a SegmentClass and a Region without label; the mask's fixed fields; one run
# [class, length] at its longest (a length of up to 5 digits, and the comma).
_SEGMENT_CLASS_BYTES = 40
_REGION_BYTES = 75
_MASK_BYTES = 50
_RUN_BYTES = 9


def _label_bytes(manifest: Manifest) -> int:
    return max((len(label) for label in manifest.labels or []), default=0)


def _keypoint_bytes(names: list[str] | None, count: int) -> int:
    named = sum(len(n) + _NAME_BYTES for n in names or [])
    return count * _KEYPOINT_BYTES + named


def _detect_bytes(manifest: Manifest) -> int | None:
    spec = manifest.decoder
    per = _DETECTION_BYTES + _label_bytes(manifest)
    if isinstance(spec, YoloDecoder):
        return _ENVELOPE_BYTES + spec.max_detections * per
    if isinstance(spec, AnchorsDecoder):
        if spec.keypoints:
            # Anchors keypoints carry no score: about the size of one with a short name.
            per += _KEYPOINTS_FIELD_BYTES + _keypoint_bytes(spec.keypoint_names, spec.keypoints)
        return _ENVELOPE_BYTES + spec.max_detections * per
    try:
        scores = manifest.outputs[detect_order(manifest.outputs)[2]]
    except ValueError:
        return None  # not SSD outputs: the deploy refuses the model anyway
    return _ENVELOPE_BYTES + math.prod(scores.shape) * per


def _segment_bytes(pipeline: PipelineConfig, manifest: Manifest) -> int | None:
    layout = segment_layout(manifest.outputs[0].shape)
    if layout is None:
        return None  # the deploy refuses the model
    config = pipeline.segment
    height, width, channels = layout
    classes = channels if channels > 1 else len(manifest.labels or []) or 256
    # Every class or region reported covers min_region_area: no more of them fit a frame.
    fit = math.floor(1 / config.min_region_area) if config.min_region_area > 0 else classes
    label = _label_bytes(manifest)
    size = _ENVELOPE_BYTES + min(classes, fit) * (_SEGMENT_CLASS_BYTES + label)
    size += min(config.max_regions, fit) * (_REGION_BYTES + label)
    if config.mask_size is not None:
        # At most one run per mask cell (a class change at every cell): the upper bound.
        side = config.mask_size
        cells = min(side, height) * min(side, width)
        size += _MASK_BYTES + cells * _RUN_BYTES
    return size


def estimate_bytes(pipeline: PipelineConfig, manifest: Manifest) -> int | None:
    """The largest JSON result, roughly, for tasks where it is easy to tell; else None."""
    task = manifest.task
    if task == "classify":
        classes = math.prod(manifest.outputs[0].shape)
        count = min(pipeline.top_k, classes)
        return _ENVELOPE_BYTES + count * (_CLASS_BYTES + _label_bytes(manifest))
    if task == "keyword":  # the one keyword that fired
        return _ENVELOPE_BYTES + _CLASS_BYTES + _label_bytes(manifest)
    if task == "keypoints":
        points = math.prod(manifest.outputs[0].shape) // 3
        return _ENVELOPE_BYTES + _keypoint_bytes(manifest.labels, points)
    if task == "detect":
        return _detect_bytes(manifest)
    if task == "segment":
        return _segment_bytes(pipeline, manifest)
    return None


_WHAT = {
    "classify": "top_k classes",
    "keyword": "the keyword",
    "keypoints": "every keypoint",
    "detect": "detections at most",
    "segment": "classes, regions and mask at most",
}
_REMEDY = {
    "raw": "raise pipelines[{name}].raw.max_values (at most 4096) for the values",
    "segment": "lower pipelines[{name}].segment.mask_size or max_regions, raise "
    "min_region_area, or publish less often (publish.mode)",
    "detect": "raise threshold, lower the decoder's max_detections (edge-convert bundle "
    "--max-detections), or publish less often (publish.mode)",
    "keypoints": "publish less often (publish.mode)",
}


def result_size_remedy(pipeline: PipelineConfig, manifest: Manifest) -> str:
    """What to change when ``result_size_warning`` warns."""
    default = "lower top_k, raise threshold, or publish less often (publish.mode)"
    return _REMEDY.get(manifest.task, default).format(name=pipeline.name)


def result_size_warning(pipeline: PipelineConfig, manifest: Manifest) -> str | None:
    """One line when the pipeline would publish more than its cap or about 2 KB."""
    where = f"{manifest.name} {manifest.version}"
    if manifest.task == "raw":
        cap = pipeline.raw.max_values
        over = [(math.prod(t.shape), t.name) for t in manifest.outputs if math.prod(t.shape) > cap]
        if not over:
            return None
        size, name = max(over)
        others = f" (and {len(over) - 1} more output(s))" if len(over) > 1 else ""
        return (
            f"{where}: raw output {name!r} has {size} values per frame, over raw.max_values "
            f"{cap}{others}: results carry its shape, min, max, mean and argmax only"
        )
    estimate = estimate_bytes(pipeline, manifest)
    if estimate is None or estimate <= MAX_RESULT_BYTES:
        return None
    what = _WHAT.get(manifest.task, "at most")
    return (
        f"{where}: results may reach about {estimate / 1024:.1f} KB ({what}), over "
        f"{MAX_RESULT_BYTES // 1024} KB per result"
    )
