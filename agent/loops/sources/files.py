"""Video files and folders of images, looped or played once, paced or as fast as possible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ImagesSource, VideoSource
from agent.loops.sources.base import EndOfStream, Source, SourceError, register
from agent.loops.sources.camera import import_cv2
from agent.loops.sources.jpeg import MjpegReader

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@register("video")
class VideoFile(Source):
    def __init__(self, config: VideoSource) -> None:
        self.config = config
        self._cap: Any = None
        self._mjpeg: MjpegReader | None = None
        self._fps: float | None = None

    @property
    def fps(self) -> float | None:
        return self._fps if self.config.pace == "native" else None

    def open(self) -> None:
        cv2 = import_cv2()
        if not self.config.path.is_file():
            raise SourceError(f"video file not found: {self.config.path}")
        cap = cv2.VideoCapture(str(self.config.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot decode video {self.config.path}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self._fps = float(fps) if fps and fps > 0 else 25.0
        self._cap = cap
        self._mjpeg = MjpegReader.attach(cv2, cap, f"video {self.config.path}")

    def _next(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        if self._mjpeg is not None:
            return self._mjpeg.read(self.target_size)
        ok, frame = self._cap.read()
        return (frame, {}) if ok else None

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        item = self._next()
        if item is not None:
            return item
        if not self.config.loop:
            raise EndOfStream()
        cv2 = import_cv2()
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        item = self._next()
        if item is None:
            raise SourceError(f"cannot read frames from {self.config.path}")
        return item

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
            self._mjpeg = None


@register("images")
class ImageFolder(Source):
    def __init__(self, config: ImagesSource) -> None:
        self.config = config
        self._files: list[Path] = []
        self._i = 0
        self.undecodable = 0

    @property
    def fps(self) -> float | None:
        return self.config.fps

    def open(self) -> None:
        import_cv2()
        folder = self.config.path
        if not folder.is_dir():
            raise SourceError(f"image folder not found: {folder}")
        self._files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise SourceError(f"no images (jpg, png, bmp) in {folder}")
        self._i = 0

    def read(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        cv2 = import_cv2()
        if self._i >= len(self._files):
            if not self.config.loop:
                raise EndOfStream()
            self._i = 0
        path = self._files[self._i]
        self._i += 1
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            # One bad file is skipped, not fatal: the folder may be written to live.
            self.undecodable += 1
            return None
        return frame, {"file": path.name}
