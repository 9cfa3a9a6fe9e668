"""OpenCV cameras: a device index, /dev/videoN, an RTSP or HTTP URL, or a GStreamer pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.config import CameraSource
from agent.loops.sources.base import Source, SourceError, register
from agent.loops.sources.jpeg import MjpegReader


def import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError(
            "OpenCV is not installed: pip install 'edge-deploy[camera]' (opencv-python-headless)"
        ) from None
    return cv2


@register("camera")
class OpenCvCamera(Source):
    live = True

    def __init__(self, config: CameraSource) -> None:
        self.config = config
        self._cap: Any = None
        self._mjpeg: MjpegReader | None = None

    def open(self) -> None:
        cv2 = import_cv2()
        device = self.config.device
        if isinstance(device, str) and "!" in device:
            cap = cv2.VideoCapture(device, cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(device)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open camera {device!r}")
        for prop, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, self.config.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, self.config.height),
            (cv2.CAP_PROP_FPS, self.config.fps),
        ):
            if value:
                cap.set(prop, value)
        self._cap = cap
        # An MJPG stream through FFmpeg (an HTTP or RTSP MJPEG camera) is decoded at
        # the model's size. V4L2 devices are left to OpenCV: untested on real ones.
        self._mjpeg = MjpegReader.attach(cv2, cap, f"camera {device!r}")

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self._mjpeg is not None:
            item = self._mjpeg.read(self.target_size)
        else:
            ok, frame = self._cap.read()
            item = (frame, {}) if ok and frame is not None else None
        if item is None:
            # A camera that stops delivering is gone (unplugged, stream dropped): reopen.
            raise SourceError(f"camera {self.config.device!r} stopped delivering frames")
        return item

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
            self._mjpeg = None
