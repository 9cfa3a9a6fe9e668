"""``edge-agent check``'s result-size estimates for the new tasks (keypoints, segment,
YOLO and anchors detectors, keyword): bounded by the settings that bound the result,
and checked against the JSON of the largest result those settings allow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import PipelineConfig
from agent.models.manifest import Manifest, parse_manifest
from agent.ops.result_size import estimate_bytes, result_size_remedy, result_size_warning
from agent.protocol import (
    ClassScore,
    Detection,
    Keypoint,
    Region,
    Result,
    RleMask,
    Segmentation,
    SegmentClass,
)
from tests.lifecycle_support import manifest_for

DIGITS = {"type": "synthetic", "kind": "digits", "width": 8, "height": 8, "channels": 1}
NAMES = [f"point_{i:02d}" for i in range(17)]


@pytest.fixture(scope="module")
def base(tiny_int8_model: Path) -> dict[str, Any]:
    return manifest_for(tiny_int8_model, "m", "1")


def manifest(base: dict[str, Any], task: str, shape: list[int], **over: Any) -> Manifest:
    out = {**base["outputs"][0], "shape": shape}
    return parse_manifest({**base, "task": task, "outputs": [out], **over})


def pipeline(**over: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "p", "model": "m", "source": DIGITS, **over})


def size_of(**fields: Any) -> int:
    """Bytes of a result with the longest figures the agent writes."""
    result = Result(device="device-0001", pipeline="p", model="m", version="1", seq=123456,
                    ts=1790000000.123, frame=123456, latency_ms=12.345, **fields)  # fmt: skip
    return len(result.to_bytes())


def test_keypoints_grow_with_the_points_and_their_names(base: dict[str, Any]) -> None:
    pose = manifest(base, "keypoints", [1, 1, 17, 3], labels=NAMES)
    estimate = estimate_bytes(pipeline(), pose)
    points = [Keypoint(name=n, x=1234.5, y=1234.5, score=0.9876) for n in NAMES]
    actual = size_of(keypoints=points)
    assert estimate is not None and actual <= estimate <= 1.5 * actual
    assert result_size_warning(pipeline(), pose) is None  # 17 points: ~1.2 KB
    many = manifest(base, "keypoints", [1, 1, 133, 3])  # whole-body pose
    warning = result_size_warning(pipeline(), many)
    assert warning is not None and "KB (every keypoint)" in warning


def test_segment_is_bounded_by_min_area_regions_and_the_mask(base: dict[str, Any]) -> None:
    labels = [f"class-{i:02d}" for i in range(21)]
    seg = manifest(base, "segment", [1, 256, 256, 21], labels=labels)
    default = pipeline()  # min_region_area 0.01 leaves room for every class; 16 regions
    estimate = estimate_bytes(default, seg)
    largest = size_of(segmentation=Segmentation(
        classes=[SegmentClass(index=i, label=labels[i], area=0.0476) for i in range(21)],
        regions=[Region(index=i, label=labels[i], area=0.0123, box=(1234.5,) * 4)
                 for i in range(16)],
    ))  # fmt: skip
    assert estimate is not None and largest <= estimate <= 1.5 * largest
    assert result_size_warning(pipeline(segment={"min_region_area": 0.1}), seg) is None
    # A 32 x 32 mask can change class at every cell: 1,024 runs at most.
    masked = pipeline(segment={"mask_size": 32, "max_regions": 0})
    runs = [(i % 21, 1) for i in range(32 * 32)]
    worst = size_of(segmentation=Segmentation(
        classes=[SegmentClass(index=i, label=labels[i], area=0.0476) for i in range(21)],
        regions=[], mask=RleMask(width=32, height=32, runs=runs),
    ))  # fmt: skip
    estimate = estimate_bytes(masked, seg)
    assert estimate is not None and worst <= estimate <= 1.5 * worst
    warning = result_size_warning(masked, seg)
    assert warning is not None and "(classes, regions and mask at most)" in warning
    assert "segment.mask_size" in result_size_remedy(masked, seg)


def test_yolo_and_anchors_detections_at_most_max_detections(base: dict[str, Any]) -> None:
    yolo = manifest(base, "detect", [1, 84, 2100], labels=[f"c{i}" for i in range(80)],
                    decoder={"type": "yolov8", "max_detections": 10})  # fmt: skip
    estimate = estimate_bytes(pipeline(), yolo)
    boxes = [Detection(index=79, label="c79", score=0.98765, box=(1234.5,) * 4)] * 10
    assert estimate is not None and size_of(detections=boxes) <= estimate
    assert result_size_warning(pipeline(), yolo) is None
    hundred = yolo.model_copy(update={"decoder": yolo.decoder.model_copy(  # type: ignore[union-attr]
        update={"max_detections": 100})})  # fmt: skip
    warning = result_size_warning(pipeline(), hundred)
    assert warning is not None and "(detections at most)" in warning
    assert "max_detections" in result_size_remedy(pipeline(), hundred)

    names = ["right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear"]
    face = parse_manifest({**base, "task": "detect", "labels": ["face"],
        "inputs": [{**base["inputs"][0], "shape": [1, 128, 128, 3]}],
        "outputs": [{**base["outputs"][0], "name": "r", "shape": [1, 896, 16]},
                    {**base["outputs"][0], "name": "s", "shape": [1, 896, 1]}],
        "decoder": {"type": "anchors", "strides": [8, 16, 16, 16], "box_scale": 128,
                    "keypoints": 6, "keypoint_names": names, "max_detections": 3}})  # fmt: skip
    estimate = estimate_bytes(pipeline(), face)
    faces = [
        Detection(
            index=0,
            label="face",
            score=0.98765,
            box=(1234.5,) * 4,
            keypoints=[Keypoint(name=n, x=1234.5, y=1234.5) for n in names],
        )
    ] * 3
    actual = size_of(detections=faces)  # fmt: skip
    assert estimate is not None and actual <= estimate <= 1.5 * actual
    assert result_size_warning(pipeline(), face) is None


def test_a_keyword_result_is_one_class(base: dict[str, Any]) -> None:
    labels = ["_silence_", "_unknown_", "yes", "no", "a-rather-long-keyword"]
    spotter = manifest(base, "keyword", [1, 5], labels=labels)
    estimate = estimate_bytes(pipeline(), spotter)
    actual = size_of(classes=[ClassScore(index=4, label=labels[4], score=0.98765)])
    assert estimate is not None and actual <= estimate <= 1.5 * actual
    assert result_size_warning(pipeline(), spotter) is None
