"""Detection decoders, chosen by the manifest's ``decoder``: output tensors to boxes in
source pixels. ``make_detector`` is the one place that maps a decoder type to its class."""

from __future__ import annotations

from collections.abc import Sequence

from agent.loops.decoders.anchors import AnchorsDetector
from agent.loops.decoders.ssd import SsdDetector
from agent.loops.decoders.yolo import YoloDetector
from agent.loops.postprocess import Postprocessor
from agent.models.decoder_spec import AnchorsDecoder, YoloDecoder
from agent.models.manifest import Manifest
from agent.models.runtime import TensorInfo

__all__ = ["AnchorsDetector", "SsdDetector", "YoloDetector", "make_detector"]


def make_detector(
    manifest: Manifest,
    outputs: Sequence[TensorInfo],
    labels: Sequence[str] | None,
    input_size: tuple[int, int],
    threshold: float,
) -> Postprocessor:
    """The post-processor for a ``detect`` manifest's decoder (none or ssd: the SSD op's
    outputs). ``input_size`` is the model input's (width, height) in pixels."""
    spec = manifest.decoder
    if isinstance(spec, YoloDecoder):
        return YoloDetector(spec, outputs, labels, input_size, threshold)
    if isinstance(spec, AnchorsDecoder):
        return AnchorsDetector(spec, outputs, labels, input_size, threshold)
    return SsdDetector(outputs, labels, input_size, threshold)
