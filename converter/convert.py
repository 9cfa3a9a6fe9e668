"""The source model (Keras file or SavedModel) and its conversion with TFLiteConverter."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter.errors import ConverterError, UnquantizableOps, first_line
from converter.flatbuffer import read_flatbuffer
from converter.progress import ProgressBar
from converter.tfimport import import_tensorflow, quiet_fds

Quantization = Literal["int8", "int8-float-io", "float16", "dynamic"]
QUANTIZATIONS: tuple[Quantization, ...] = ("int8", "int8-float-io", "float16", "dynamic")
KERAS_SUFFIXES = (".keras", ".h5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_OP_PATTERNS = (
    re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op"),
    re.compile(r"not (?:yet )?supported for op:? '?(?:tfl?\.)?(\w+)'?"),
)
_CUSTOM_OPS = re.compile(r"^Custom ops: (.+)$", re.M)


@dataclass
class SourceModel:
    """A float model loaded in TensorFlow, with a batch-1 input shape."""

    path: Path
    kind: Literal["keras", "saved_model"]
    handle: Any
    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]

    def predict(self, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
        """Every output for every sample, in the model's output order."""
        tf = import_tensorflow()
        chunks: list[list[np.ndarray]] = []
        for start in range(0, len(x), batch):
            inputs = tf.constant(x[start : start + batch])
            if self.kind == "keras":
                result = self.handle(inputs, training=False)
            else:
                result = self.handle(inputs)
            chunks.append([np.asarray(t) for t in _flat_outputs(tf, result)])
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def tflite_converter(self) -> Any:
        tf = import_tensorflow()
        if self.kind == "keras":
            return tf.lite.TFLiteConverter.from_keras_model(self.handle)
        return tf.lite.TFLiteConverter.from_saved_model(str(self.path))


def _flat_outputs(tf: Any, result: Any) -> list[Any]:
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return list(tf.nest.flatten(result))


def check_model_path(path: Path) -> None:
    """The cheap checks, before TensorFlow is imported."""
    if not path.exists():
        raise ConverterError(f"{path}: not found")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ConverterError(f"{path}: directory is not a SavedModel (no saved_model.pb)")
    elif path.suffix not in KERAS_SUFFIXES:
        raise ConverterError(
            f"{path}: not a model (expected a .keras or .h5 file or a SavedModel directory)"
        )
    elif path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ConverterError(f"{path}: not a Keras model (a .keras file is a zip archive)")
    elif path.suffix == ".h5" and _head(path) != HDF5_SIGNATURE:
        raise ConverterError(f"{path}: not a Keras model (not an HDF5 file)")


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(HDF5_SIGNATURE))


def load_source_model(path: Path, input_shape: Sequence[int] | None = None) -> SourceModel:
    """The model at ``path``; a Keras model's input fixed at ``input_shape``
    (``--input-shape``) when given (its dynamic dims chosen)."""
    check_model_path(path)
    tf = import_tensorflow()
    try:
        with quiet_fds():
            if path.is_dir():
                loaded = tf.saved_model.load(str(path))
            else:
                loaded = tf.keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises anything from ValueError to zipfile errors
        kind = "SavedModel" if path.is_dir() else "Keras model"
        raise ConverterError(f"{path}: not a loadable {kind} ({first_line(exc)})") from None
    if path.is_dir():
        if input_shape is not None:
            raise ConverterError(
                f"{path}: --input-shape is for Keras models; export the SavedModel with a "
                "fixed input signature, or convert its .keras file"
            )
        return _saved_model(path, loaded)
    return _keras_model(path, loaded, input_shape)


def _suggested(dims: Sequence[int | None]) -> str:
    """A shape to give for dynamic dims: batch 1, H and W of an image, else N."""
    image = len(dims) == 4
    return ",".join(
        str(d)
        if d is not None
        else "1"
        if i == 0
        else ("H", "W")[i - 1]
        if image and i < 3
        else "N"
        for i, d in enumerate(dims)
    )


def _batch1(path: Path, shape: Any, what: str = "input") -> tuple[int, ...]:
    dims = list(shape)
    if dims and dims[0] is None:
        dims[0] = 1
    if any(d is None for d in dims):
        hint = f": give --input-shape {_suggested(dims)}" if what == "input" else ""
        raise ConverterError(
            f"{path}: {what} shape {dims} has unknown dimensions besides batch{hint}"
        )
    return tuple(int(d) for d in dims)


def _fixed_input(path: Path, model: Any, input_shape: Sequence[int]) -> Any:
    """The Keras model called on an input of ``input_shape``: a model whose every shape
    is known, so the .tflite has no dynamic dims (XNNPACK cannot resize them)."""
    tf = import_tensorflow()
    declared = list(model.inputs[0].shape)
    shape = [int(d) for d in input_shape]
    if len(shape) != len(declared) or any(
        d is not None and d != s for d, s in zip(declared[1:], shape[1:], strict=True)
    ):
        raise ConverterError(
            f"{path}: --input-shape {','.join(map(str, shape))} does not fit input shape "
            f"{declared} (same rank; only unknown dims may be chosen)"
        )
    if shape[0] != 1:
        raise ConverterError(f"{path}: --input-shape must have batch 1, not {shape[0]}")
    inp = tf.keras.Input(batch_shape=tuple(shape), dtype=model.inputs[0].dtype)
    try:
        with quiet_fds():
            return tf.keras.Model(inp, model(inp))
    except Exception as exc:  # the layers reject the shape
        raise ConverterError(
            f"{path}: the model does not build at --input-shape "
            f"{','.join(map(str, shape))} ({first_line(exc)})"
        ) from None


def _keras_model(path: Path, model: Any, input_shape: Sequence[int] | None = None) -> SourceModel:
    if len(model.inputs) != 1:
        raise ConverterError(f"{path}: models with {len(model.inputs)} inputs are not supported")
    if input_shape is not None:
        model = _fixed_input(path, model, input_shape)
    return SourceModel(
        path=path,
        kind="keras",
        handle=model,
        input_shape=_batch1(path, model.inputs[0].shape),
        output_shapes=[_batch1(path, t.shape, "output") for t in model.outputs],
    )


def _saved_model(path: Path, loaded: Any) -> SourceModel:
    signature = getattr(loaded, "signatures", {}).get("serving_default")
    if signature is None:
        raise ConverterError(f"{path}: SavedModel has no serving_default signature")
    specs = list(signature.structured_input_signature[1].values())
    if len(specs) != 1:
        raise ConverterError(f"{path}: models with {len(specs)} inputs are not supported")
    outputs = signature.structured_outputs
    output_shapes = [_batch1(path, outputs[k].shape, "output") for k in sorted(outputs)]

    def call(x: Any) -> Any:
        return signature(x)

    return SourceModel(path, "saved_model", call, _batch1(path, specs[0].shape), output_shapes)


def convert(
    source: SourceModel,
    quantization: Quantization | None,
    calibration: np.ndarray | None = None,
    progress: ProgressBar | None = None,
) -> bytes:
    """The .tflite bytes; ``quantization=None`` gives the plain float32 model."""
    tf = import_tensorflow()
    converter = source.tflite_converter()
    if quantization in ("int8", "int8-float-io"):
        if calibration is None or len(calibration) == 0:
            raise ConverterError(f"--quant {quantization} needs calibration data (--calib)")
        samples = calibration

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(len(samples)):
                yield [samples[i : i + 1]]
                if progress is not None:
                    progress.advance()

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if quantization == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    elif quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with quiet_fds() as captured:
            data = bytes(converter.convert())
    except Exception as exc:  # ConverterError, ValueError, RuntimeError... all mean "cannot"
        text = f"{exc}\n{captured.text}"
        ops = _ops_named_in(text)
        if ops:
            raise UnquantizableOps(ops, "TFLite has no builtin kernel for") from None
        raise ConverterError(f"conversion failed: {first_line(exc)}") from None
    if quantization in ("int8", "int8-float-io"):
        # The converter silently leaves ops without an int8 kernel in float32.
        float_ops = read_flatbuffer(data).float_ops()
        if float_ops:
            raise UnquantizableOps(float_ops)
    return data


def _ops_named_in(text: str) -> list[str]:
    ops: set[str] = set()
    for pattern in _OP_PATTERNS:
        ops.update(pattern.findall(text))
    for match in _CUSTOM_OPS.findall(text):
        ops.update(op.strip() for op in match.split(",") if op.strip())
    return sorted(ops)
