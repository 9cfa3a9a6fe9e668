"""The Raspberry Pi camera stack (picamera2, Raspberry Pi OS Bookworm)."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.config import PiCamera2Source
from agent.loops.sources.base import Source, SourceError, register


@register("picamera2")
class PiCamera(Source):
    live = True

    def __init__(self, config: PiCamera2Source) -> None:
        self.config = config
        self._cam: Any = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise SourceError(
                "picamera2 is not installed: on Raspberry Pi OS run "
                "'sudo apt install python3-picamera2' and create the venv with "
                "--system-site-packages"
            ) from None
        try:
            cam = Picamera2()
            controls = {"FrameRate": self.config.fps} if self.config.fps else {}
            cam.configure(
                cam.create_video_configuration(
                    main={"size": (self.config.width, self.config.height), "format": "BGR888"},
                    controls=controls,
                )
            )
            cam.start()
        except Exception as exc:  # the driver raises many kinds; all mean "no camera"
            raise SourceError(f"cannot start the Pi camera: {exc}") from None
        self._cam = cam

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            return self._cam.capture_array("main"), {}
        except Exception as exc:
            raise SourceError(f"Pi camera capture failed: {exc}") from None

    def close(self) -> None:
        if self._cam is not None:
            try:
                self._cam.stop()
                self._cam.close()
            finally:
                self._cam = None
