"""Motion-JPEG decoded at the size the model needs, not at the camera's.

A JPEG decoder can scale by 1/2, 1/4 or 1/8 inside its inverse DCT, which costs far
less than decoding the full frame and then shrinking it, and averages the pixels as
a good downscale should. For a 640x480 stream and a 224x224 model that is a third
of the capture thread's work (decode, then pre-process a quarter of the pixels),
and on a Raspberry Pi decoding is most of it.

``MjpegReader`` takes over an OpenCV capture whose stream is Motion-JPEG read by the
FFmpeg backend (files, HTTP and RTSP MJPEG cameras): it asks OpenCV for the
compressed frames (``CAP_PROP_FORMAT`` -1) and decodes each itself at the largest
reduction that leaves it at least the source's ``target_size`` both ways. Frames
that come out smaller carry ``meta["source_size"]``, the stream's own size, so
detections are still reported in source pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.loops.sources.base import SourceError

SOURCE_SIZE = "source_size"
_REDUCTIONS = (8, 4, 2)
# Undecodable frames in a row before the stream counts as broken (and is reopened).
_MAX_BAD = 10


def reduction_for(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The largest of 8, 4, 2 that keeps ``size`` (w, h) at least ``target`` both ways; else 1."""
    if target is None:
        return 1
    w, h = size
    for r in _REDUCTIONS:
        if w // r >= target[0] and h // r >= target[1]:
            return r
    return 1


class MjpegReader:
    """Reads an MJPG stream's compressed frames from ``cap`` and decodes them reduced."""

    def __init__(self, cv2: Any, cap: Any, size: tuple[int, int], name: str) -> None:
        self._cv2 = cv2
        self._cap = cap
        self.size = size
        self._name = name
        self.undecodable = 0
        self._flags = {
            1: cv2.IMREAD_COLOR,
            2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8,
        }

    @classmethod
    def attach(cls, cv2: Any, cap: Any, name: str) -> MjpegReader | None:
        """A reader for ``cap`` when its stream is MJPG through FFmpeg and OpenCV hands
        out compressed frames; None (``cap`` untouched) otherwise."""
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little")
        if cap.getBackendName() != "FFMPEG" or fourcc.upper() != b"MJPG":
            return None
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if min(size) <= 0 or not cap.set(cv2.CAP_PROP_FORMAT, -1):
            return None
        return cls(cv2, cap, size, name)

    def read(self, target: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next frame, reduced for ``target``; None at the end of the stream. A
        corrupt frame (a glitch on the wire) is skipped and counted."""
        r = reduction_for(self.size, target)
        for _ in range(_MAX_BAD):
            ok, packet = self._cap.read()
            if not ok or packet is None:
                return None
            frame = self._cv2.imdecode(packet, self._flags[r])
            if frame is not None:
                return frame, ({} if r == 1 else {SOURCE_SIZE: self.size})
            self.undecodable += 1
        raise SourceError(f"{self._name}: {_MAX_BAD} frames in a row are not JPEG images")
