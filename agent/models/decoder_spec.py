"""The manifest's ``decoder``: how a ``detect`` model's output tensors become boxes.

One definition, read by the agent (which builds the decoder from it), the converter
(``edge-convert bundle --task detect --decoder ...`` writes it, ``inspect`` suggests
it) and the validation child (which refuses outputs that do not fit it). Only
parameters live here; the decoding is in ``agent/loops/decoders/``.

- ``ssd``: the TFLite ``TFLite_Detection_PostProcess`` op's four outputs (boxes,
  classes, scores, count); the op has done the decoding and the suppression.
- ``yolov5``: one output ``[1, N, 5 + C]``: cx, cy, w, h, objectness, C class scores.
- ``yolov8``: one output ``[1, 4 + C, N]`` (v8 and v11): cx, cy, w, h, C class scores,
  no objectness.
- ``anchors``: regressors ``[1, N, 4 + 2K (+ more)]`` and scores ``[1, N, 1]`` over a
  fixed anchor grid generated from ``strides`` (the MediaPipe / BlazeFace kind), with
  ``keypoints`` K points per box and weighted non-maximum suppression.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(ge=0, le=1)]
MaxDetections = Annotated[int, Field(ge=1, le=1000)]


class SsdDecoder(_Strict):
    type: Literal["ssd"] = "ssd"


class YoloDecoder(_Strict):
    type: Literal["yolov5", "yolov8"]
    iou: Fraction = Field(default=0.45, description="NMS: overlap above which the lower box goes")
    max_detections: MaxDetections = 100
    class_agnostic: bool = Field(
        default=False, description="NMS across classes too (default: per class)"
    )
    normalized: bool | None = Field(
        default=None,
        description="boxes in 0..1 of the input (true) or in input pixels (false); "
        "none: decided from the values",
    )


class AnchorsDecoder(_Strict):
    """MediaPipe's SsdAnchorsCalculator with ``fixed_anchor_size`` and its
    TensorsToDetectionsCalculator: anchors of size 1 (the regressors carry the box size)
    at each cell's centre, boxes ``anchor + regressor / box_scale`` in fractions of the
    input. BlazeFace short range (128x128): strides [8, 16, 16, 16], 2 per cell, box_scale
    128, 6 keypoints, 896 anchors."""

    type: Literal["anchors"]
    strides: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="one per feature map layer, e.g. [8, 16, 16, 16]"
    )
    anchors_per_cell: Annotated[int, Field(ge=1, le=16)] = Field(
        default=2,
        description="anchors per feature-map cell and layer (consecutive layers with "
        "the same stride are merged, their anchors added)",
    )
    anchor_offset: Fraction = 0.5
    box_scale: Annotated[float, Field(gt=0)] = Field(
        description="regressors divided by this are fractions of the input (MediaPipe's "
        "x/y/w/h_scale; BlazeFace: 128, its input size, so regressors are input pixels)"
    )
    keypoints: Annotated[int, Field(ge=0, le=64)] = 0
    keypoint_names: list[str] | None = None
    score_clip: Annotated[float, Field(gt=0)] = 100.0
    min_score: Fraction = Field(
        default=0.5,
        description="anchors scoring below this are never decoded (MediaPipe's "
        "min_score_thresh); a pipeline's higher threshold drops more",
    )
    iou: Fraction = 0.3
    max_detections: MaxDetections = 100

    @model_validator(mode="after")
    def _names_fit(self) -> AnchorsDecoder:
        if self.keypoint_names is not None and len(self.keypoint_names) != self.keypoints:
            raise ValueError(
                f"keypoint_names has {len(self.keypoint_names)} names for "
                f"{self.keypoints} keypoints"
            )
        return self


Decoder: TypeAlias = Annotated[
    SsdDecoder | YoloDecoder | AnchorsDecoder, Field(discriminator="type")
]
DECODER_TYPES = ("ssd", "yolov5", "yolov8", "anchors")
