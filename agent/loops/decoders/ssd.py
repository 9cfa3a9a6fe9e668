"""SSD detectors: the TFLite ``TFLite_Detection_PostProcess`` op has decoded the boxes and
suppressed the overlaps already, so this only thresholds and maps boxes to source pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.loops.decoders.nms import detections
from agent.loops.postprocess import FrameContext, Output
from agent.models.health import detect_order
from agent.models.runtime import TensorInfo


class SsdDetector:
    """TFLite SSD post-processing outputs: boxes [1,N,4] (ymin, xmin, ymax, xmax in 0..1),
    classes [1,N], scores [1,N], count [1]. Boxes come out in source pixels."""

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        threshold: float = 0.5,
    ) -> None:
        self.order = detect_order(outputs)
        self.outputs = list(outputs)
        self.labels = list(labels) if labels else None
        self.input_w, self.input_h = input_size
        self.threshold = threshold

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        ib, ic, isc, icount = self.order
        boxes = self.outputs[ib].dequantize(values[ib]).reshape(-1, 4)
        classes = self.outputs[ic].dequantize(values[ic]).reshape(-1)
        scores = self.outputs[isc].dequantize(values[isc]).reshape(-1)
        n = min(int(self.outputs[icount].dequantize(values[icount]).reshape(-1)[0]), len(scores))
        counted = scores[:n]
        keep = np.nonzero(counted >= self.threshold)[0]
        if keep.size == 0:
            return Output(detections=[], scores=counted)
        b = boxes[keep]
        x0, y0 = b[:, 1] * self.input_w, b[:, 0] * self.input_h
        x1, y1 = b[:, 3] * self.input_w, b[:, 2] * self.input_h
        transform = frame.transform
        if transform is not None:
            x0, y0 = transform.to_source(x0, y0)
            x1, y1 = transform.to_source(x1, y1)
        ids = [int(c) for c in classes[keep].tolist()]
        found = detections(ids, scores[keep].tolist(), (x0, y0, x1, y1), self.labels)
        return Output(detections=found, scores=counted)
