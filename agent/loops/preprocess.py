"""Frames to input tensors, as the bundle's manifest and the interpreter's input say.

Images: resize (stretch or letterbox), colour order, then mean/std normalisation
and quantisation folded into one step: for uint8 frames a per-channel 256-entry
lookup table maps pixel values straight to the model's int8/uint8 codes, so the
per-frame work is a resize and one table lookup. Sensor windows: normalise,
quantise, reshape. Everything is vectorised; OpenCV is used when installed, with a
numpy fallback so the agent runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.loops.audio_features import LogMel
from agent.models.manifest import Preprocess
from agent.models.runtime import TensorInfo

cv2: Any
try:  # optional: the camera extra
    import cv2
except ImportError:  # pragma: no cover - exercised on devices without OpenCV
    cv2 = None


class PreprocessError(ValueError):
    """A frame that cannot be turned into this model's input."""


@dataclass(frozen=True)
class Transform:
    """How source pixels map to model pixels, for putting boxes back on the source."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    source_w: int
    source_h: int

    def for_source(self, width: int, height: int) -> Transform:
        """The same mapping for a frame that was a reduced copy of a ``width`` x
        ``height`` source (decoded at 1/2, 1/4 ...): boxes land in the source's pixels."""
        fx, fy = self.source_w / width, self.source_h / height
        return Transform(
            self.scale_x * fx, self.scale_y * fy, self.pad_x, self.pad_y, width, height
        )

    def to_source(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model pixel coordinates to source pixel coordinates."""
        sx = np.clip((x - self.pad_x) / self.scale_x, 0, self.source_w)
        sy = np.clip((y - self.pad_y) / self.scale_y, 0, self.source_h)
        return sx, sy


def limit_opencv_threads(n: int = 1) -> None:
    """OpenCV splits a resize over every core by default. The agent gets its
    parallelism from pipelining (capture and pre-processing of the next frame overlap
    the current invoke), so a split resize only steals the inference threads' cores."""
    if cv2 is not None and cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    if cv2 is not None:
        # Anti-aliased downscaling at a fraction of INTER_AREA's cost: OpenCV's area
        # filter is fast only for integer factors, so a shrink of k or more is first
        # averaged over k x k blocks (its fast path), then resized bilinearly by a
        # factor under 2, where bilinear does not alias.
        ndim = image.ndim
        k = min(w // width, h // height)
        if k >= 2:
            image = cv2.resize(image, (w // k, h // k), interpolation=cv2.INTER_AREA)
        if image.shape[1::-1] != (width, height):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return image if image.ndim == ndim else image[..., None]
    # Without OpenCV: nearest neighbour by index arrays (no per-pixel Python).
    ys = (np.arange(height) * h // height).clip(0, h - 1)
    xs = (np.arange(width) * w // width).clip(0, w - 1)
    return image[ys][:, xs]


class ImagePreprocessor:
    """Image frames (H x W x C uint8, BGR) to one model input tensor."""

    def __init__(
        self,
        tensor: TensorInfo,
        spec: Preprocess,
        resize: Literal["stretch", "letterbox"] = "stretch",
    ) -> None:
        if len(tensor.shape) != 4:
            raise PreprocessError(f"image model input must be 4-D, got shape {tensor.shape}")
        self.tensor = tensor
        self.spec = spec
        self.resize = resize
        if spec.layout == "NCHW":
            _, self.channels, self.height, self.width = tensor.shape
        else:
            _, self.height, self.width, self.channels = tensor.shape
        if self.channels not in (1, 3):
            raise PreprocessError(f"image model input needs 1 or 3 channels, not {self.channels}")
        if spec.color == "gray" and self.channels != 1:
            raise PreprocessError("manifest says gray but the model input has 3 channels")
        self.dtype = np.dtype(tensor.dtype)
        self._lut = self._build_lut()
        self._cv_lut = self._opencv_lut()
        self._stretch: Transform | None = None

    def _build_lut(self) -> np.ndarray:
        """(channels, 256) table: pixel value -> normalised, quantised input value."""
        mean = np.broadcast_to(np.asarray(self.spec.mean, np.float64), (self.channels,))
        std = np.broadcast_to(np.asarray(self.spec.std, np.float64), (self.channels,))
        values = (np.arange(256, dtype=np.float64)[None, :] - mean[:, None]) / std[:, None]
        return self.tensor.quantize(values)

    def _opencv_lut(self) -> np.ndarray | None:
        """The table in ``cv2.LUT``'s shape, when OpenCV can apply it: one call that
        releases the GIL, instead of a gather per channel. When every channel shares
        one table (one mean and std, the usual case) it is a single 256 x 1 table
        applied to the image viewed as one channel, twice as fast as a 3-channel one."""
        if cv2 is None:
            return None
        if self.channels == 1 or bool((self._lut == self._lut[0]).all()):
            table = np.ascontiguousarray(self._lut[0].reshape(256, 1))
            probe = np.zeros((2, 2), np.uint8)
        else:
            table = np.ascontiguousarray(self._lut.T.reshape(256, 1, self.channels))
            probe = np.zeros((2, 2, self.channels), np.uint8)
        try:
            out = cv2.LUT(probe, table)
        except cv2.error:  # a depth OpenCV's LUT does not take (float16): numpy does it
            return None
        return table if out.dtype == self.dtype else None

    def _color(self, image: np.ndarray) -> np.ndarray:
        """Channels in the model's order; runs on the resized image, the small one."""
        if image.ndim == 2:
            image = image[..., None]
        have = image.shape[2]
        if self.channels == 1:
            if have == 1:
                return image
            # BGR -> luma with integer weights (ITU-R BT.601), no float image needed.
            bgr = image.astype(np.uint16)
            gray = (29 * bgr[..., 0] + 150 * bgr[..., 1] + 77 * bgr[..., 2]) >> 8
            return gray.astype(np.uint8)[..., None]
        if have == 1:
            return np.repeat(image, 3, axis=2)
        if have == 4:
            image = image[..., :3]
        if self.spec.color != "rgb":
            return image
        if cv2 is not None:
            return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2RGB)
        return image[..., ::-1]

    def _map(self, image: np.ndarray) -> np.ndarray:
        """Pixel values -> input codes through the table; a new array (one per frame,
        so frames prepared ahead of the worker never share a buffer)."""
        if self._cv_lut is not None:
            image = np.ascontiguousarray(image)
            if self._cv_lut.ndim == 2:  # one shared table: the image as one channel
                image = image.reshape(self.height, self.width * self.channels)
            mapped = cv2.LUT(image, self._cv_lut)
            return mapped.reshape(self.height, self.width, self.channels)
        if self.channels == 1:
            return self._lut[0][image]
        return np.stack([self._lut[c][image[..., c]] for c in range(3)], axis=-1)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Transform]:
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise PreprocessError(
                f"expected an 8-bit image (H x W [x C]), got {image.dtype} {image.shape}"
            )
        src_h, src_w = image.shape[:2]
        have = 1 if image.ndim == 2 else image.shape[2]
        # Resize first: colour conversion and the table lookup then touch the small image.
        if self.resize == "letterbox":
            scale = min(self.width / src_w, self.height / src_h)
            new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
            pad_x, pad_y = (self.width - new_w) // 2, (self.height - new_h) // 2
            canvas = np.zeros((self.height, self.width, have), np.uint8)
            resized = _resize(image, new_w, new_h)
            canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized.reshape(
                new_h, new_w, have
            )
            image = canvas
            transform = Transform(scale, scale, pad_x, pad_y, src_w, src_h)
        else:
            image = _resize(image, self.width, self.height).reshape(self.height, self.width, have)
            cached = self._stretch
            if cached is not None and (cached.source_w, cached.source_h) == (src_w, src_h):
                transform = cached
            else:
                transform = Transform(self.width / src_w, self.height / src_h, 0, 0, src_w, src_h)
                self._stretch = transform
        mapped = self._map(self._color(image))
        if self.spec.layout == "NCHW":
            return np.ascontiguousarray(mapped.transpose(2, 0, 1))[None], transform
        return mapped[None], transform


class WindowPreprocessor:
    """Sensor windows (samples x channels, float) to one model input tensor."""

    def __init__(self, tensor: TensorInfo, spec: Preprocess) -> None:
        self.tensor = tensor
        self.dtype = np.dtype(tensor.dtype)
        self.size = int(np.prod(tensor.shape))
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)

    def __call__(self, window: np.ndarray) -> tuple[np.ndarray, None]:
        if window.size != self.size:
            raise PreprocessError(
                f"window of {window.shape} ({window.size} values) does not fit input "
                f"{self.tensor.shape} ({self.size} values)"
            )
        x = (window.astype(np.float32) - self.mean) / self.std
        return self.tensor.quantize(x).reshape(self.tensor.shape), None


class AudioPreprocessor:
    """Audio windows (samples, float in [-1, 1]) to one model input tensor: the
    manifest's ``preprocess.audio`` front end (log-mel or waveform), then ``mean``/``std``
    and quantisation. Log-mel inputs are ``[1, frames, n_mels]`` or ``[1, frames,
    n_mels, 1]``; waveform inputs hold the window's samples in any shape."""

    def __init__(self, tensor: TensorInfo, spec: Preprocess) -> None:
        assert spec.audio is not None
        self.tensor = tensor
        self.spec = spec
        self.size = int(np.prod(tensor.shape))
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)
        self.sample_rate = spec.audio.sample_rate
        self.log_mel: LogMel | None = None
        self.samples = self.size
        if spec.audio.features == "log_mel":
            shape = list(tensor.shape)
            n_mels = spec.audio.n_mels
            fits = len(shape) in (3, 4) and shape[0] == 1 and shape[2] == n_mels
            if not fits or self.size != shape[1] * n_mels:
                raise PreprocessError(
                    f"input {tensor.name!r} {shape} does not take log-mel features: expected "
                    f"[1, frames, {n_mels}] or [1, frames, {n_mels}, 1]"
                )
            self.log_mel = LogMel(spec.audio)
            self.frames = shape[1]
            self.samples = self.log_mel.samples_for(self.frames)

    def __call__(self, window: np.ndarray) -> tuple[np.ndarray, None]:
        audio = np.asarray(window, np.float32).reshape(-1)
        if self.log_mel is None:
            if audio.size != self.size:
                raise PreprocessError(
                    f"audio window of {audio.size} samples does not fit waveform input "
                    f"{self.tensor.name!r} {list(self.tensor.shape)} ({self.size} samples)"
                )
            x = audio
        else:
            frames = self.log_mel.frames(audio.size)
            if frames != self.frames:
                raise PreprocessError(
                    f"audio window of {audio.size} samples gives {frames} log-mel frames; "
                    f"input {self.tensor.name!r} {list(self.tensor.shape)} wants {self.frames} "
                    f"({self.samples} samples at {self.sample_rate} Hz, "
                    "check window_s and sample_rate)"
                )
            x = self.log_mel(audio)
        x = (x - self.mean) / self.std
        return self.tensor.quantize(x).reshape(self.tensor.shape), None


def make_preprocessor(
    tensor: TensorInfo, spec: Preprocess, resize: Literal["stretch", "letterbox"] = "stretch"
) -> ImagePreprocessor | WindowPreprocessor | AudioPreprocessor:
    """Audio when the manifest has ``preprocess.audio``; images for 4-D inputs with 1 or
    3 channels; windows for everything else."""
    if spec.audio is not None:
        return AudioPreprocessor(tensor, spec)
    channels = tensor.shape[1] if spec.layout == "NCHW" else tensor.shape[-1]
    if len(tensor.shape) == 4 and channels in (1, 3):
        return ImagePreprocessor(tensor, spec, resize)
    return WindowPreprocessor(tensor, spec)
