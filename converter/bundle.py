"""Bundles: the manifest built from the model itself, signing, atomic publishing.

Signing, canonical bytes and the atomic write are the agent's own
(``agent.models.manifest``), so what the converter writes is what a device checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import TypeAdapter, ValidationError

from agent.models.decoder_spec import DECODER_TYPES, Decoder
from agent.models.detect_layout import suggest_decoder
from agent.models.golden import Golden
from agent.models.health import NamedTensor, Reference
from agent.models.manifest import (
    MANIFEST_FILE,
    BundleError,
    Calibration,
    Manifest,
    Metrics,
    ModelFile,
    Preprocess,
    Producer,
    StateLink,
    Task,
    TensorSpec,
    check_model_file,
    check_state_names,
    load_private_key,
    read_bundle,
    sign_manifest,
    write_bundle,
)
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import LoadedModel, LoaderError, TensorInfo, fits, load_model
from agent.protocol import format_validation_error, validate_name
from converter import __version__
from converter.errors import ConverterError
from converter.flatbuffer import ModelFlatbuffer, read_flatbuffer
from converter.reference import DEFAULT_GOLDEN, check_golden_count, health_from_data
from converter.tfimport import tensorflow_version

# Tasks whose first output is one score per label.
CLASS_TASKS = ("classify", "keyword")
_DECODER: TypeAdapter[Decoder] = TypeAdapter(Decoder)
# One shape per model input (``--input-shape``), or None: the file's own shapes.
InputShapes: TypeAlias = Sequence[Sequence[int]] | None
ManifestQuantization = Literal["int8", "int8-float-io", "float16", "dynamic", "none"]


@dataclass(frozen=True)
class BundleSpec:
    """What the user says about a bundle; the rest is read from the model."""

    name: str
    version: str
    task: Task = "classify"
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    # detect: the decoder's spec as given (``type`` may be missing: recognised from
    # the outputs); see ``resolve_decoder``.
    decoder: dict[str, Any] | None = None
    # A streaming model's state: links, or ``"input:output"`` as ``--state`` gives them
    # (tensor names may hold ':' themselves: resolved against the model's names).
    state: Sequence[StateLink | str] | None = None


def resolve_state(
    given: Sequence[StateLink | str] | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> list[StateLink] | None:
    """The manifest's ``state``: each ``input:output`` split where it names an input of
    the model and an output of it; ``ConverterError`` naming the tensors otherwise."""
    if not given:
        return None
    in_names = [t.name for t in inputs]
    out_names = [t.name for t in outputs]
    links = []
    for item in given:
        if isinstance(item, StateLink):
            links.append(item)
            continue
        splits = [
            (item[:i], item[i + 1 :])
            for i, ch in enumerate(item)
            if ch == ":" and item[:i] in in_names and item[i + 1 :] in out_names
        ]
        if len(splits) != 1:
            raise ConverterError(
                f"--state {item!r} is not INPUT:OUTPUT of this model "
                f"(inputs {in_names}, outputs {out_names})"
            )
        links.append(StateLink(input=splits[0][0], output=splits[0][1]))
    try:
        check_state_names(links, list(inputs), list(outputs))
    except ValueError as exc:
        raise ConverterError(f"--state: {exc}") from None
    return links


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
    if labels is None or task not in CLASS_TASKS or not output_shape:
        return
    classes = output_shape[-1]
    if len(labels) != classes:
        raise ConverterError(
            f"labels file has {len(labels)} labels but the model outputs {classes} classes"
        )


def resolve_decoder(
    task: str, given: dict[str, Any] | None, outputs: Sequence[NamedTensor]
) -> Decoder | None:
    """The manifest's decoder: as given (``--decoder``, its options, ``--decoder-json``),
    its type recognised from the outputs when not given and unambiguous."""
    if task != "detect":
        if given:
            raise ConverterError(f"--decoder and its options are for --task detect, not {task}")
        return None
    spec = dict(given or {})
    if "type" not in spec:
        kind = suggest_decoder(outputs)
        if kind is None:
            shapes = ", ".join(f"{t.name!r} {list(t.shape)}" for t in outputs)
            raise ConverterError(
                f"cannot tell the decoder from the outputs ({shapes}): "
                f"give --decoder {{{','.join(DECODER_TYPES)}}}"
            )
        spec["type"] = kind
    try:
        return _DECODER.validate_python(spec)
    except ValidationError as exc:
        raise ConverterError(f"decoder: {format_validation_error(exc, spec)}") from None


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


def tensor_specs(
    model: bytes, input_shapes: InputShapes = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the agent's runtime reports them, dynamic inputs resized to
    ``input_shapes`` (``--input-shape``); a dynamic input without one is refused."""
    return specs_of(load_fixed(model, input_shapes))


def specs_of(loaded: LoadedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return [_spec(t) for t in loaded.inputs], [_spec(t) for t in loaded.outputs]


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


def _suggested(signature: Sequence[int]) -> str:
    """A shape to give for a dynamic signature: batch 1, H and W of an image, else N."""
    image = len(signature) == 4
    dims = [
        str(d) if d >= 0 else "1" if i == 0 else ("H", "W")[i - 1] if image and i < 3 else "N"
        for i, d in enumerate(signature)
    ]
    return ",".join(dims)


def load_fixed(model: bytes, input_shapes: InputShapes = None) -> LoadedModel:
    """The model loaded by the agent's loader at fixed input shapes: each dynamic input
    resized to its ``--input-shape``; ``ConverterError`` (one line) when an input is
    dynamic without one, or a given shape does not fit its input."""
    try:
        probe = load_model(model)
    except LoaderError as exc:
        raise ConverterError(str(exc)) from None
    if input_shapes:
        if len(input_shapes) != len(probe.inputs):
            raise ConverterError(
                f"{len(input_shapes)} --input-shape option(s) for a model with "
                f"{len(probe.inputs)} input(s): give one per input, in input order"
            )
        for t, shape in zip(probe.inputs, input_shapes, strict=True):
            signature = t.signature or t.shape
            if not fits(signature, shape) or min(shape, default=1) < 1:
                raise ConverterError(
                    f"--input-shape {_shape_text(shape)} does not fit input {t.name!r} of "
                    f"shape {list(signature)} (same rank; only -1 dims may be chosen)"
                )
    else:
        for t in probe.inputs:
            if t.dynamic:
                raise ConverterError(
                    f"input {t.name!r} shape {list(t.signature)} is dynamic: give "
                    f"--input-shape {_suggested(t.signature)}"
                )
        return probe
    try:
        return load_model(model, input_shapes=input_shapes)
    except LoaderError as exc:
        raise ConverterError(str(exc)) from None


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
    reference: Reference | None = None,
    golden: Golden | None = None,
    input_shapes: InputShapes = None,
) -> dict[str, Any]:
    inputs, outputs = tensor_specs(model, input_shapes)
    state = resolve_state(spec.state, inputs, outputs)
    carried = {link.output for link in state or ()}
    task_outputs = [t for t in outputs if t.name not in carried]
    if spec.task in CLASS_TASKS:
        check_labels(spec.labels, tuple(task_outputs[0].shape), spec.task)
    decoder = resolve_decoder(spec.task, spec.decoder, task_outputs)
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
        decoder=decoder,
        preprocess=spec.preprocess,
        metrics=metrics,
        calibration=calibration,
        reference=reference,
        golden=golden,
        producer=Producer(converter=f"edge-convert {__version__}", tensorflow=tensorflow_version()),
        state=state,
    )
    try:
        check_outputs(manifest)
    except OutputMismatch as exc:
        raise ConverterError(f"outputs do not fit --task {spec.task}: {exc}") from None
    return manifest.model_dump(mode="json")


def publish(
    dest: Path, model: bytes | Path, manifest: dict[str, Any], key: Ed25519PrivateKey | None
) -> Path:
    signature = sign_manifest(manifest, key) if key is not None else None
    return write_bundle(dest, model, manifest, signature)


def wrap_tflite(
    path: Path,
    dest: Path,
    spec: BundleSpec,
    key: Ed25519PrivateKey | None,
    *,
    val: Path | None = None,
    golden: int = DEFAULT_GOLDEN,
    samples: int | None = None,
    input_shapes: InputShapes = None,
) -> dict[str, Any]:
    """``edge-convert bundle``: an existing .tflite as a bundle, described by the model
    itself; with ``val``, reference statistics and golden samples from that data too.
    A .tflite with dynamic input dims needs ``input_shapes``: the manifest records them,
    and the device resizes the model's inputs to them at load."""
    if not path.is_file():
        raise ConverterError(f"{path}: not found")
    if val is not None and not val.exists():
        raise ConverterError(f"{val}: not found")
    check_golden_count(golden)
    check_destination(dest)
    model = path.read_bytes()
    try:
        fb = read_flatbuffer(model)
    except ConverterError as exc:
        raise ConverterError(f"{path}: {exc}") from None
    inputs, outputs = tensor_specs(model, input_shapes)
    quantization = infer_quantization(inputs, fb)
    state = resolve_state(spec.state, inputs, outputs)
    carried = {link.output for link in state or ()}
    task_outputs = [t for t in outputs if t.name not in carried]
    decoder = resolve_decoder(spec.task, spec.decoder, task_outputs)
    reference, golden_block = (
        health_from_data(
            model,
            spec.task,
            spec.preprocess,
            val,
            golden,
            samples,
            quantization=quantization,
            decoder=decoder,
            input_shapes=input_shapes,
            state=state,
            labels=spec.labels,
        )
        if val is not None
        else (None, None)
    )
    manifest = build_manifest(
        model,
        spec,
        quantization,
        reference=reference,
        golden=golden_block,
        input_shapes=input_shapes,
    )
    publish(dest, model, manifest, key)
    return manifest


def sign_bundle(path: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign (or re-sign) a bundle in place, atomically; its model must match its manifest."""
    bundle = read_bundle(path)
    check_model_file(bundle.model_path, bundle.manifest)
    publish(path, bundle.model_path, bundle.manifest_data, key)
    return bundle.manifest_data
