"""The files of frames worth labelling: one pipeline's directory of kept frames, each an
image (``.jpg`` or ``.npy``) and a sidecar ``.json`` named ``<capture ms>-<frame seq>``,
and the budget rule that decides which to keep (agent.loops.capture runs them).

Writes are atomic (temp file, fsync, rename) and the image is renamed into place
before its sidecar, so a sidecar always has its whole image beside it: a scan at start
keeps complete pairs and removes the rest (temp files, images without a sidecar,
sidecars without their image).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.models.manifest import fsync_dir

cv2: Any
try:
    import cv2
except ImportError:  # the agent runs without OpenCV (sensor devices): frames go to .npy
    cv2 = None

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
# <capture ms, 13 digits>-<frame seq>.<jpg|npy|json>: sorted by name is sorted by time.
FILE_RE = re.compile(r"^(?P<stem>[0-9]{13}-[0-9]{1,20})\.(?P<ext>jpg|npy|json)$")
EXTENSION = {"jpeg": "jpg", "npy": "npy"}
TEMP_SUFFIX = ".tmp"


def encode_frame(data: Any, fmt: str) -> tuple[bytes, str]:
    """(file bytes, format): JPEG for an 8-bit image when asked and OpenCV is there,
    else the array as .npy (sensor windows, float frames, no OpenCV)."""
    array = np.asarray(data)
    image = array.dtype == np.uint8 and (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    )
    if fmt == "jpeg" and image and cv2 is not None:
        ok, buffer = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if ok:
            return buffer.tobytes(), "jpeg"
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue(), "npy"


def json_default(value: Any) -> Any:
    """For sidecars: frame metadata is the source's; numpy scalars become numbers,
    anything else unknown to JSON its text."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)[:200]


@dataclass(frozen=True, slots=True)
class Kept:
    """One kept frame: ``image`` and ``stem``.json in the pipeline's directory. ``rank``
    orders them (lower is kept first): the confidence, or 0 when there was none."""

    stem: str
    image: str
    format: str
    rank: float
    confidence: float | None
    reason: str
    version: str
    ts: float
    sha256: str
    image_bytes: int
    size: int  # image and sidecar, in bytes

    @property
    def sidecar(self) -> str:
        return f"{self.stem}.json"

    def listing(self, pipeline: str) -> dict[str, Any]:
        return {
            "pipeline": pipeline,
            "file": self.image,
            "sidecar": self.sidecar,
            "format": self.format,
            "bytes": self.image_bytes,
            "sha256": self.sha256,
            "confidence": self.confidence,
            "reason": self.reason,
            "version": self.version,
            "ts": self.ts,
        }


def plan_keep(
    kept: Iterable[Kept], rank: float, size: int, max_frames: int, max_bytes: int
) -> list[Kept] | None:
    """The kept frames to remove so that a new one of ``rank`` and ``size`` bytes fits
    the budget, highest rank first and only those ranked above it; None: it does not fit."""
    if size > max_bytes:
        return None
    entries = list(kept)
    count = len(entries)
    total = sum(k.size for k in entries)
    worst_first = sorted(entries, key=lambda k: k.rank, reverse=True)
    evict: list[Kept] = []
    while count + 1 > max_frames or total + size > max_bytes:
        if len(evict) == len(worst_first) or worst_first[len(evict)].rank <= rank:
            return None
        worst = worst_first[len(evict)]
        evict.append(worst)
        count -= 1
        total -= worst.size
    return evict


class CaptureFolder:
    """One pipeline's directory of kept frames. Used by its writer thread; ``path`` also
    by the local API."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_dir()

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_pair(self, kept: Kept, image: bytes, sidecar: bytes) -> None:
        """Image, then sidecar, each atomically, then the directory entry; raises OSError."""
        self._write(kept.image, image)
        self._write(kept.sidecar, sidecar)
        fsync_dir(self.path)

    def _write(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self, kept: Kept) -> None:
        """Never raises. The sidecar first: an image without one is a half write."""
        for name in (kept.sidecar, kept.image):
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as exc:
                logger.debug("cannot remove capture %s: %s", self.path / name, exc)

    def scan(self) -> tuple[list[Kept], int]:
        """The complete pairs in the directory (made if missing), and how many files of
        half writes were removed; raises OSError when it cannot be listed."""
        self.make()
        names = set(os.listdir(self.path))
        found: dict[str, Kept] = {}
        doomed = {n for n in names if n.startswith(".") and n.endswith(TEMP_SUFFIX)}
        for name in sorted(names - doomed):
            match = FILE_RE.match(name)
            if match is None or match["ext"] != "json":
                continue  # images below; anything not ours is left alone
            kept = self._read_sidecar(match["stem"], names)
            if kept is None:
                doomed.add(name)
            else:
                found[kept.stem] = kept
        for name in names - doomed:
            match = FILE_RE.match(name)
            if match is not None and match["ext"] != "json" and match["stem"] not in found:
                doomed.add(name)  # an image whose sidecar was never written
        for name in sorted(doomed):
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
        return list(found.values()), len(doomed)

    def _read_sidecar(self, stem: str, names: set[str]) -> Kept | None:
        try:
            sidecar = self.path / f"{stem}.json"
            body = json.loads(sidecar.read_bytes())
            image = body["file"]
            match = FILE_RE.match(image) if isinstance(image, str) else None
            if match is None or match["stem"] != stem or image not in names:
                return None
            image_bytes = (self.path / image).stat().st_size
            if image_bytes != body["bytes"]:
                return None
            confidence = body.get("confidence")
            return Kept(
                stem=stem,
                image=image,
                format=str(body["format"]),
                rank=0.0 if confidence is None else float(confidence),
                confidence=None if confidence is None else float(confidence),
                reason=str(body["reason"]),
                version=str(body["version"]),
                ts=float(body["ts"]),
                sha256=str(body["sha256"]),
                image_bytes=image_bytes,
                size=image_bytes + sidecar.stat().st_size,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
