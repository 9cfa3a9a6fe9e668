"""Golden samples: a few model inputs and the outputs the converter's runtime produced.

They travel *inside* the manifest, so the bundle's signature covers them and every
delivery path (URL, MQTT chunks, the fleet server) carries them with no second file. To
fit in a deploy command (256 KB), a sample's input may be stored reduced: every axis
between the batch and the channel axis is kept at every ``f``-th position, and the
device restores it exactly by repeating each value ``f`` times (``unpack``); the
converter computes the golden outputs on that restored tensor, so the device runs the
very same input. An output may be stored at every ``stride``-th element.

The validation child runs each sample and compares (``compare``): quantised outputs in
quantisation steps (codes), float outputs relative to the output's largest magnitude.
A runtime, delegate or CPU that computes the model wrongly is refused before the model
serves. Pure numpy: the converter imports this too.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

# Raw sample bytes kept in a manifest (inputs and outputs, before base64).
GOLDEN_BUDGET = 64 * 1024
MAX_SAMPLES = 16
MAX_OUTPUT_ELEMENTS = 1024
DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "bool")
# Measured (docs/model-health.md): the same int8 models differ by up to 2 steps between
# LiteRT 2.3, tflite-runtime 2.14 and the reference kernels (1 and 2 threads alike), and
# int8 models' float outputs (int8-float-io) show those steps as up to 1.7% of the
# output's range. Twice that is the default; the converter sets tighter float
# tolerances for float models (converter/reference.py).
TOLERANCE_STEPS = 4.0
TOLERANCE_FLOAT = 0.04


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GoldenTensor(_Strict):
    dtype: str = Field(pattern="^(" + "|".join(DTYPES) + ")$")
    shape: list[NonNegativeInt] = Field(description="the tensor's full shape", max_length=8)
    stored: list[NonNegativeInt] | None = Field(
        default=None, description="inputs: the reduced shape stored (restore by repeating)"
    )
    stride: int = Field(default=1, ge=1, description="outputs: every stride-th element kept")
    data: str = Field(description="base64 of the stored values, C order")


class GoldenSample(_Strict):
    inputs: list[GoldenTensor] = Field(min_length=1)
    outputs: list[GoldenTensor] = Field(min_length=1)


class Golden(_Strict):
    runtime: str = Field(description="the runtime that produced the outputs")
    tolerance_steps: float = Field(
        default=TOLERANCE_STEPS,
        ge=0,
        description="quantised outputs: largest accepted difference in steps",
    )
    tolerance_float: float = Field(
        default=TOLERANCE_FLOAT,
        ge=0,
        description="float outputs: largest difference / output's max |value|",
    )
    samples: list[GoldenSample] = Field(min_length=1, max_length=MAX_SAMPLES)


class GoldenError(ValueError):
    """A golden sample that cannot be decoded (one line)."""


# ------------------------------------------------------------------------- packing


def _reduced_axes(rank: int) -> list[int]:
    # Images [1, H, W, C]: H and W; a window [1, T, C]: T; a vector [1, N]: N.
    if rank >= 3:
        return list(range(1, rank - 1))
    return [1] if rank == 2 else []


def reduce_input(x: np.ndarray, max_bytes: int) -> tuple[np.ndarray, int]:
    """The smallest factor ``f`` whose reduced tensor fits ``max_bytes``, and that tensor."""
    axes = _reduced_axes(x.ndim)
    f = 1
    while True:
        index = tuple(
            slice(None, None, _step(x.shape[a], f)) if a in axes else slice(None)
            for a in range(x.ndim)
        )
        reduced = np.ascontiguousarray(x[index])
        if reduced.nbytes <= max_bytes or not axes or all(x.shape[a] <= f for a in axes):
            return reduced, f
        f += 1


def _step(n: int, f: int) -> int:
    """The step that keeps as many of ``n`` values as every ``f``-th does, and that
    ``restore`` repeats by: kept values go back exactly where they were (10 values at
    every 6th keep 2, and 2 values restore 5 each, so step 5, not 6)."""
    return math.ceil(n / math.ceil(n / f)) if n > 0 else 1


def restore(reduced: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The full input from its reduced copy: each kept value repeated along its axis."""
    out = reduced
    if out.ndim != len(shape):
        raise GoldenError(f"golden input of shape {list(reduced.shape)} cannot make {list(shape)}")
    for axis in _reduced_axes(len(shape)):
        if out.shape[axis] != shape[axis] and out.shape[axis] > 0:
            f = math.ceil(shape[axis] / out.shape[axis])
            out = np.repeat(out, f, axis=axis)
            out = np.take(out, np.arange(shape[axis]), axis=axis)
    if tuple(out.shape) != tuple(shape):
        raise GoldenError(f"golden input of shape {list(reduced.shape)} cannot make {list(shape)}")
    return np.ascontiguousarray(out)


def pack_input(x: np.ndarray, max_bytes: int) -> tuple[GoldenTensor, np.ndarray]:
    """The stored form of an input, and the full tensor the device will feed."""
    reduced, f = reduce_input(x, max_bytes)
    full = restore(reduced, x.shape) if f > 1 else x
    tensor = GoldenTensor(
        dtype=str(x.dtype),
        shape=list(x.shape),
        stored=list(reduced.shape) if f > 1 else None,
        data=base64.b64encode(reduced.tobytes()).decode("ascii"),
    )
    return tensor, full


def pack_output(y: np.ndarray, max_elements: int = MAX_OUTPUT_ELEMENTS) -> GoldenTensor:
    stride = max(1, math.ceil(y.size / max_elements))
    kept = np.ascontiguousarray(y.reshape(-1)[::stride])
    return GoldenTensor(
        dtype=str(y.dtype),
        shape=list(y.shape),
        stride=stride,
        data=base64.b64encode(kept.tobytes()).decode("ascii"),
    )


def _values(t: GoldenTensor) -> np.ndarray:
    try:
        raw = base64.b64decode(t.data, validate=True)
    except (binascii.Error, ValueError):
        raise GoldenError("golden data is not base64") from None
    dtype = np.dtype(t.dtype)
    if len(raw) % dtype.itemsize:
        raise GoldenError(f"golden data of {len(raw)} bytes is not a whole number of {t.dtype}")
    return np.frombuffer(raw, dtype=dtype)


def unpack_input(t: GoldenTensor) -> np.ndarray:
    values = _values(t)
    stored = t.stored if t.stored is not None else t.shape
    if values.size != math.prod(stored):
        raise GoldenError(
            f"golden input holds {values.size} values, shape {stored} needs {math.prod(stored)}"
        )
    return restore(values.reshape(stored), t.shape)


def unpack_output(t: GoldenTensor) -> np.ndarray:
    """The kept elements (flat) of an output."""
    values = _values(t)
    expected = len(range(0, math.prod(t.shape), t.stride))
    if values.size != expected:
        raise GoldenError(f"golden output holds {values.size} values, expected {expected}")
    return values


# ------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class OutputCheck:
    sample: int
    output: int
    checked: int
    over: int  # elements beyond the tolerance
    worst: float  # in steps (quantised) or relative (float)
    quantised: bool


def compare(
    golden: Golden,
    sample: int,
    output: int,
    actual: np.ndarray,
    scale: float,
) -> OutputCheck:
    """The device's raw output tensor against the golden one (codes when ``scale`` > 0)."""
    expected_t = golden.samples[sample].outputs[output]
    if list(actual.shape) != expected_t.shape or str(actual.dtype) != expected_t.dtype:
        return OutputCheck(sample, output, 0, 1, math.inf, scale > 0)
    kept = actual.reshape(-1)[:: expected_t.stride].astype(np.float64)
    expected = unpack_output(expected_t).astype(np.float64)
    quantised = scale > 0 and actual.dtype.kind in "iu"
    diff = np.abs(kept - expected)
    if quantised:
        limit = golden.tolerance_steps
        worst = float(diff.max()) if diff.size else 0.0
    else:
        magnitude = float(np.abs(expected).max()) if expected.size else 0.0
        diff = diff / max(magnitude, 1e-6)
        limit = golden.tolerance_float
        worst = float(diff.max()) if diff.size else 0.0
    if not np.all(np.isfinite(kept)):
        return OutputCheck(sample, output, int(kept.size), int(kept.size), math.inf, quantised)
    return OutputCheck(sample, output, int(kept.size), int(np.sum(diff > limit)), worst, quantised)


def describe_failure(check: OutputCheck, golden: Golden) -> str:
    where = f"golden sample {check.sample} output {check.output}"
    if check.checked == 0:
        expected = golden.samples[check.sample].outputs[check.output]
        return (
            f"{where}: the output is not {expected.dtype}{expected.shape} "
            f"as when {golden.runtime} computed it"
        )
    unit = "steps" if check.quantised else "of the output's range"
    limit = golden.tolerance_steps if check.quantised else golden.tolerance_float
    worst = "not finite" if math.isinf(check.worst) else f"{check.worst:g} {unit}"
    return (
        f"{where}: {check.over} of {check.checked} checked values differ by more than "
        f"{limit:g} {unit} (worst {worst}) from what {golden.runtime} computed"
    )
