"""Candidate bundles for model-health tests: broken in one known way each, or good.

Each maker copies a good converted bundle to ``dest``, changes exactly one thing, and
signs the result with ``key``, so the candidate passes every check a device makes
before it runs the model (checksum, signature, manifest schema) and is caught, if at
all, by model health: validation on golden samples, shadow evaluation, drift.

    good = build_colors_bundle(tmp / "v1", "1", key_path)
    bad = swapped_channels(good, tmp / "v2", key_path)            # version "1-swapped"
    bad = wrong_normalisation(good, tmp / "v3", key_path, version="3")

The kinds (issue 17):
- ``wrong_normalisation``: manifest ``preprocess.std`` 1 instead of 255 (or any mean/std).
- ``swapped_channels``: manifest ``preprocess.color`` rgb <-> bgr (3-channel inputs only:
  a grey model ignores the colour order, hence the colors example).
- ``shuffled_labels``: the labels permuted so that no class keeps its name.
- ``perturbed_golden``: the golden outputs moved by many quantisation steps, which is
  what a device whose runtime computes wrong int8 sees (its outputs differ from the
  converter's by as much).
- a good candidate: ``retrained`` (the seed-1 example model, converted).

A device refuses a version it stores already and a manifest created before its active
one (``downgrade``): ``restamped`` gives a bundle a fresh version and creation time, so
a candidate can follow any other (make it first, then break it: the makers keep the
creation time).

No TensorFlow here, except through ``retrained`` (the converter; or a prebuilt copy).
"""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.models.golden import Golden, GoldenTensor, unpack_output
from agent.models.manifest import (
    check_model_file,
    load_private_key,
    read_bundle,
    sign_manifest,
    write_bundle,
)

Key = Path | Ed25519PrivateKey
# How far perturbed golden outputs move, in multiples of the manifest's tolerance.
GOLDEN_PERTURBATION = 4.0


def _rebuild(
    bundle: Path,
    dest: Path,
    key: Key | None,
    version: str,
    change: Callable[[dict[str, Any]], None],
) -> Path:
    """``bundle`` copied to ``dest`` with ``change`` applied to its manifest, and signed."""
    source = read_bundle(bundle)
    check_model_file(source.model_path, source.manifest)
    data = copy.deepcopy(source.manifest_data)
    change(data)
    data["version"] = version
    if key is None:
        return write_bundle(dest, source.model_path, data, None)
    private = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
    return write_bundle(dest, source.model_path, data, sign_manifest(data, private))


def created_now() -> str:
    """A manifest ``created_at`` of now, to the microsecond: later than any made before."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def restamped(bundle: Path, dest: Path, key: Key, *, version: str) -> Path:
    """``bundle`` at ``dest`` under ``version``, created now, signed: new to any device."""

    def change(data: dict[str, Any]) -> None:
        data["created_at"] = created_now()

    return _rebuild(bundle, dest, key, version, change)


def _version(bundle: Path, suffix: str, version: str | None) -> str:
    return version if version is not None else f"{read_bundle(bundle).manifest.version}-{suffix}"


def wrong_normalisation(
    bundle: Path,
    dest: Path,
    key: Key,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    version: str | None = None,
) -> Path:
    """The manifest's preprocessing says ``mean``/``std`` (default: std 1, mean kept),
    so the device feeds the model inputs on the wrong scale."""

    def change(data: dict[str, Any]) -> None:
        pre = data.setdefault("preprocess", {})
        old = (pre.get("mean"), pre.get("std"))
        pre["std"] = std if std is not None else [1.0]
        if mean is not None:
            pre["mean"] = mean
        if (pre.get("mean"), pre["std"]) == old:
            raise ValueError(f"{bundle}: preprocessing already has mean {old[0]} and std {old[1]}")

    return _rebuild(bundle, dest, key, _version(bundle, "normalisation", version), change)


def swapped_channels(bundle: Path, dest: Path, key: Key, *, version: str | None = None) -> Path:
    """The manifest's colour order swapped (rgb <-> bgr): the model is fed BGR for RGB."""

    def change(data: dict[str, Any]) -> None:
        pre = data.setdefault("preprocess", {})
        channels = data["inputs"][0]["shape"][-1]
        if channels != 3 or pre.get("color", "rgb") == "gray":
            raise ValueError(f"{bundle}: the input has no colour order to swap")
        pre["color"] = "bgr" if pre.get("color", "rgb") == "rgb" else "rgb"

    return _rebuild(bundle, dest, key, _version(bundle, "swapped", version), change)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of ``range(n)`` that moves every index (n >= 2)."""
    if n < 2:
        raise ValueError("a label permutation that moves every label needs two labels")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return [int(i) for i in order]


def shuffled_labels(
    bundle: Path, dest: Path, key: Key, *, seed: int = 0, version: str | None = None
) -> Path:
    """The labels permuted so that no class keeps its own name (an export that mixed them)."""

    def change(data: dict[str, Any]) -> None:
        labels = data.get("labels")
        if not labels:
            raise ValueError(f"{bundle}: the manifest has no labels to shuffle")
        data["labels"] = [labels[i] for i in derangement(len(labels), seed)]

    return _rebuild(bundle, dest, key, _version(bundle, "shuffled", version), change)


def _moved(values: np.ndarray, by: float, every: int = 1) -> np.ndarray:
    """Every ``every``-th value moved by ``by`` (up, or down where up leaves the dtype's
    range)."""
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        step = math.ceil(by)
        wide = values.astype(np.int64)
        up = wide + step <= info.max
        moved = np.where(up, wide + step, wide - step)
    else:
        # Float outputs: relative to the largest magnitude, as golden.compare measures.
        magnitude = max(float(np.abs(values).max()) if values.size else 0.0, 1e-6)
        wide = values.astype(np.float64)
        moved = wide + by * magnitude
    out = wide.copy()
    out[::every] = moved[::every]
    return out.astype(values.dtype)


def perturbed_golden(
    bundle: Path,
    dest: Path,
    key: Key | None,
    *,
    factor: float = GOLDEN_PERTURBATION,
    steps: float | None = None,
    every: int = 1,
    version: str | None = None,
) -> Path:
    """Every ``every``-th golden output value moved by ``factor`` times the manifest's
    tolerance, or by ``steps`` (quantised outputs: steps; float ones: that many
    hundredths of the output's largest magnitude): the model is right, the golden
    samples now say what a runtime computing wrong int8 would produce, so a device that
    checks them must refuse it exactly as it would refuse that runtime. ``key`` None:
    unsigned."""

    def change(data: dict[str, Any]) -> None:
        if not data.get("golden"):
            raise ValueError(f"{bundle}: the manifest has no golden samples to perturb")
        golden = Golden.model_validate(data["golden"])
        for sample in data["golden"]["samples"]:
            for output in sample["outputs"]:
                values = unpack_output(GoldenTensor.model_validate(output))
                quantised = values.dtype.kind in "iu"
                if steps is not None:
                    by = steps if quantised else steps / 100
                else:
                    by = factor * (golden.tolerance_steps if quantised else golden.tolerance_float)
                moved = _moved(values, max(by, 1.0) if quantised else by, every)
                output["data"] = base64.b64encode(moved.tobytes()).decode("ascii")

    return _rebuild(bundle, dest, key, _version(bundle, "golden", version), change)


# Each broken kind by name: maker(bundle, dest, key, *, version=...) -> the candidate.
BROKEN_MAKERS: dict[str, Callable[..., Path]] = {
    "wrong_normalisation": wrong_normalisation,
    "swapped_channels": swapped_channels,
    "shuffled_labels": shuffled_labels,
    "perturbed_golden": perturbed_golden,
}


def retrained(
    dest: Path,
    key: Path | None,
    *,
    example: Literal["digits", "colors"] = "colors",
    version: str = "2",
) -> Path:
    """A good candidate: the same task trained again on other data (the example's seed 1),
    converted like the active one. Top-1 agreement with the seed-0 model on its
    validation set: about 0.98 for colors; it is expected to differ a little."""
    from tests.converter_support import build_colors_bundle, build_digits_bundle

    if example == "digits":
        return build_digits_bundle(dest, version, key, seed=1)
    return build_colors_bundle(dest, version, key, seed=1)
