"""Calibration and validation data: image folders, .npy, .npz (x, optional y) and CSV rows.

Every kind of data holds raw inputs as a device would see them; the preprocessing
spec (the same one the bundle's manifest records for the agent) turns them into
model inputs: ``(x - mean) / std``, images also resized and put in ``color`` order.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.models.manifest import Preprocess
from converter.errors import ConverterError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
LABEL_COLUMNS = ("label", "y", "class")


@dataclass(frozen=True)
class Dataset:
    """Model-ready samples (float32, shape ``(n, *input_shape[1:])``) and optional labels."""

    x: np.ndarray
    y: np.ndarray | None
    source: Path

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def sha256(self) -> str:
        """Identifies exactly the samples used: shape, dtype and bytes."""
        digest = hashlib.sha256()
        digest.update(repr((self.x.shape, str(self.x.dtype))).encode())
        digest.update(np.ascontiguousarray(self.x).tobytes())
        return digest.hexdigest()

    def subset(self, limit: int, seed: int = 0) -> Dataset:
        """At most ``limit`` samples, drawn without replacement in a fixed order."""
        if len(self) <= limit:
            return self
        pick = np.sort(np.random.default_rng(seed).permutation(len(self))[:limit])
        return Dataset(self.x[pick], None if self.y is None else self.y[pick], self.source)


def load_dataset(path: Path, input_shape: tuple[int, ...], preprocess: Preprocess) -> Dataset:
    """Load ``path`` for a model whose (batch-1) input shape is ``input_shape``."""
    if not path.exists():
        raise ConverterError(f"{path}: not found")
    if path.is_dir():
        x, y = _load_image_folder(path, input_shape, preprocess)
    elif path.suffix == ".npy":
        x, y = _load_array(path), None
    elif path.suffix == ".npz":
        x, y = _load_npz(path)
    elif path.suffix == ".csv":
        x, y = _load_csv(path)
    else:
        raise ConverterError(
            f"{path}: unknown data format (expected an image folder, .npy, .npz or .csv)"
        )
    if len(x) == 0:
        raise ConverterError(f"{path}: no samples")
    if y is not None and len(y) != len(x):
        raise ConverterError(f"{path}: {len(x)} samples but {len(y)} labels")
    x = _fit_shape(path, x, input_shape)
    if not path.is_dir():
        x = _normalise(x, preprocess)
    return Dataset(x.astype(np.float32), None if y is None else y.astype(np.int64), path)


def _fit_shape(path: Path, x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    sample = tuple(input_shape[1:])
    if tuple(x.shape[1:]) == sample:
        return x
    # NCHW images (PyTorch's arrays) for an NHWC input: reshaping would scramble them.
    if len(sample) == 3 and x.ndim == 4 and tuple(x.shape[1:]) == (sample[2], *sample[:2]):
        return np.transpose(x, (0, 2, 3, 1))
    # (n, 8, 8) for an (8, 8, 1) input, or flat CSV rows: same values, missing unit axes.
    if int(np.prod(x.shape[1:])) == int(np.prod(sample)) and x.ndim >= 2:
        return x.reshape((x.shape[0], *sample))
    raise ConverterError(
        f"{path}: samples have shape {list(x.shape[1:])} but the model input is {list(input_shape)}"
    )


def _normalise(x: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    x = x.astype(np.float32)
    mean = np.asarray(preprocess.mean, np.float32)
    std = np.asarray(preprocess.std, np.float32)
    if np.any(std == 0):
        raise ConverterError("--std must not contain 0")
    # One value per channel broadcasts over the last axis; one value over everything.
    if mean.size not in (1, x.shape[-1]) or std.size not in (1, x.shape[-1]):
        raise ConverterError(
            f"--mean/--std need 1 or {x.shape[-1]} values (one per channel), "
            f"got {mean.size} and {std.size}"
        )
    return (x - mean) / std


def _load_array(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConverterError(f"{path}: not a .npy array ({exc})") from None
    return _numeric(path, x)


def _numeric(path: Path, x: np.ndarray) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 1:
        raise ConverterError(f"{path}: expected a numeric array of samples, got {x.dtype}")
    return x


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise ConverterError(
                    f"{path}: .npz has no 'x' array (has: {', '.join(data.files) or 'nothing'})"
                )
            x = _numeric(path, data["x"])
            y = data["y"] if "y" in data else None
    except (OSError, ValueError) as exc:
        raise ConverterError(f"{path}: not a .npz archive ({exc})") from None
    if y is not None and not np.issubdtype(y.dtype, np.integer):
        raise ConverterError(f"{path}: 'y' must hold integer class indices, got {y.dtype}")
    return x, y


def _load_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Numeric rows, one sample per row; a header may name a label column."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConverterError(f"{path}: no samples")
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    label_col = next((header.index(c) for c in LABEL_COLUMNS if header and c in header), None)
    try:
        table = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise ConverterError(f"{path}: non-numeric value in CSV ({exc})") from None
    if table.ndim != 2:
        raise ConverterError(f"{path}: rows have different lengths")
    if label_col is None:
        return table, None
    y = table[:, label_col].astype(np.int64)
    return np.delete(table, label_col, axis=1), y


def _load_image_folder(
    path: Path, input_shape: tuple[int, ...], preprocess: Preprocess
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images directly in ``path`` (no labels), or in class subfolders (labels, sorted names)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    if classes:
        for index, name in enumerate(classes):
            files += [(f, index) for f in _images_in(path / name)]
    else:
        files = [(f, -1) for f in _images_in(path)]
    if not files:
        raise ConverterError(f"{path}: no images (.jpg, .jpeg, .png, .bmp) in the folder")
    if len(input_shape) != 4:
        raise ConverterError(
            f"{path}: an image folder needs a model input [1, H, W, C], the model has "
            f"{list(input_shape)}"
        )
    x = np.stack([_read_image(f, input_shape, preprocess) for f, _ in files])
    y = np.array([label for _, label in files]) if classes else None
    return x, y


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, input_shape: tuple[int, ...], preprocess: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    _, height, width, channels = input_shape
    try:
        with Image.open(path) as opened:
            img = opened.convert("L" if preprocess.color == "gray" else "RGB")
            img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConverterError(f"{path}: cannot decode image ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if preprocess.color == "bgr":
        pixels = pixels[..., ::-1]
    if pixels.shape[-1] != channels:
        raise ConverterError(
            f"{path}: --color {preprocess.color} gives {pixels.shape[-1]} channel(s) but the "
            f"model input has {channels}"
        )
    return _normalise(pixels, preprocess)
