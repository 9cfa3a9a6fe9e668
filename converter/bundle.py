"""Bundles: the manifest built from the model itself, signing, atomic publishing.

Signing, canonical bytes and the atomic write are the agent's own
(``agent.models.manifest``), so what the converter writes is what a device checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.models.manifest import (
    MANIFEST_FILE,
    BundleError,
    Calibration,
    Manifest,
    Metrics,
    ModelFile,
    Preprocess,
    Producer,
    TensorSpec,
    check_model_file,
    load_private_key,
    read_bundle,
    sign_manifest,
    write_bundle,
)
from agent.models.runtime import LoaderError, TensorInfo, load_model
from agent.protocol import validate_name
from converter import __version__
from converter.errors import ConverterError
from converter.flatbuffer import ModelFlatbuffer, read_flatbuffer
from converter.tfimport import tensorflow_version

Task = Literal["classify", "detect", "raw"]
TASKS: tuple[Task, ...] = ("classify", "detect", "raw")
ManifestQuantization = Literal["int8", "int8-float-io", "float16", "dynamic", "none"]


@dataclass(frozen=True)
class BundleSpec:
    """What the user says about a bundle; the rest is read from the model."""

    name: str
    version: str
    task: Task = "classify"
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)


def check_name(value: str, what: str) -> str:
    try:
        return validate_name(value)
    except ValueError as exc:
        raise ConverterError(f"{what} {value!r}: {exc}") from None


def read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConverterError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConverterError(f"{path}: cannot read labels ({exc})") from None
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ConverterError(f"{path}: labels file is empty")
    return labels


def check_labels(labels: list[str] | None, output_shape: tuple[int, ...], task: Task) -> None:
    """A classifier's labels must name each of its classes (the last output axis)."""
    if labels is None or task != "classify" or not output_shape:
        return
    classes = output_shape[-1]
    if len(labels) != classes:
        raise ConverterError(
            f"labels file has {len(labels)} labels but the model outputs {classes} classes"
        )


def load_signing_key(path: Path | None) -> Ed25519PrivateKey | None:
    if path is None:
        return None
    try:
        return load_private_key(path)
    except BundleError as exc:
        raise ConverterError(str(exc)) from None


def check_destination(dest: Path) -> None:
    """Replace an existing bundle, never some other directory or file."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ConverterError(f"{dest}: exists and is not a directory")
    if any(dest.iterdir()) and not (dest / MANIFEST_FILE).exists():
        raise ConverterError(f"{dest}: exists and is not a bundle; refusing to replace it")


def tensor_specs(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the agent's runtime reports them."""
    try:
        loaded = load_model(model)
    except LoaderError as exc:
        raise ConverterError(str(exc)) from None
    return [_spec(t) for t in loaded.inputs], [_spec(t) for t in loaded.outputs]


def _spec(t: TensorInfo) -> TensorSpec:
    return TensorSpec(
        name=t.name, shape=list(t.shape), dtype=t.dtype, scale=t.scale, zero_point=t.zero_point
    )


def infer_quantization(inputs: list[TensorSpec], fb: ModelFlatbuffer) -> ManifestQuantization:
    """For a .tflite made elsewhere: what kind of quantisation it holds."""
    if all(t.dtype in ("int8", "uint8") for t in inputs):
        return "int8"
    ops = set(fb.op_histogram())
    if "QUANTIZE" in ops and not fb.float_ops():
        return "int8-float-io"
    if fb.tensor_types.get("INT8", 0) > 0:
        return "dynamic"
    if fb.tensor_types.get("FLOAT16", 0) > 0:
        return "float16"
    return "none"


def build_manifest(
    model: bytes,
    spec: BundleSpec,
    quantization: ManifestQuantization,
    *,
    metrics: Metrics | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    inputs, outputs = tensor_specs(model)
    if spec.task == "classify":
        check_labels(spec.labels, tuple(outputs[0].shape), spec.task)
    manifest = Manifest(
        name=check_name(spec.name, "name"),
        version=check_name(spec.version, "version"),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        task=spec.task,
        quantization=quantization,
        model=ModelFile(sha256=hashlib.sha256(model).hexdigest(), size=len(model)),
        inputs=inputs,
        outputs=outputs,
        labels=spec.labels,
        preprocess=spec.preprocess,
        metrics=metrics,
        calibration=calibration,
        producer=Producer(converter=f"edge-convert {__version__}", tensorflow=tensorflow_version()),
    )
    return manifest.model_dump(mode="json")


def publish(
    dest: Path, model: bytes | Path, manifest: dict[str, Any], key: Ed25519PrivateKey | None
) -> Path:
    signature = sign_manifest(manifest, key) if key is not None else None
    return write_bundle(dest, model, manifest, signature)


def wrap_tflite(
    path: Path, dest: Path, spec: BundleSpec, key: Ed25519PrivateKey | None
) -> dict[str, Any]:
    """``edge-convert bundle``: an existing .tflite as a bundle, described by the model itself."""
    if not path.is_file():
        raise ConverterError(f"{path}: not found")
    check_destination(dest)
    model = path.read_bytes()
    try:
        fb = read_flatbuffer(model)
    except ConverterError as exc:
        raise ConverterError(f"{path}: {exc}") from None
    inputs, _ = tensor_specs(model)
    manifest = build_manifest(model, spec, infer_quantization(inputs, fb))
    publish(dest, model, manifest, key)
    return manifest


def sign_bundle(path: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign (or re-sign) a bundle in place, atomically; its model must match its manifest."""
    bundle = read_bundle(path)
    check_model_file(bundle.model_path, bundle.manifest)
    publish(path, bundle.model_path, bundle.manifest_data, key)
    return bundle.manifest_data
