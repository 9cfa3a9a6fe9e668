"""``edge-convert convert``: check inputs, convert, validate, gate, then publish.

Everything that can be checked before TensorFlow loads is checked first, and
nothing is written to the bundle directory until the gate has passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.models.manifest import Calibration, Preprocess
from agent.models.runtime import LoaderError, load_model
from converter.bundle import (
    CLASS_TASKS,
    BundleSpec,
    Task,
    build_manifest,
    check_destination,
    check_labels,
    check_name,
    load_signing_key,
    publish,
    read_labels,
    resolve_decoder,
)
from converter.convert import (
    Quantization,
    SourceModel,
    check_model_path,
    convert,
    load_source_model,
)
from converter.datasets import load_dataset
from converter.errors import ConverterError
from converter.evaluate import Evaluation, compare, run_tflite
from converter.progress import ProgressBar
from converter.reference import DEFAULT_GOLDEN, check_golden_count, golden_of, reference_of
from converter.torch_source import (
    InputLayout,
    TorchSourceModel,
    check_torch_quantization,
    check_torch_source,
    convert_torch,
    is_factory,
    is_torch_source,
    load_torch_source,
)


@dataclass(frozen=True)
class ConvertOptions:
    model: Path
    out: Path
    calib: Path | None
    val: Path | None = None
    samples: int = 300
    quantization: Quantization = "int8"
    task: Task = "classify"
    labels: Path | None = None
    name: str | None = None
    version: str = "1"
    preprocess: Preprocess = field(default_factory=Preprocess)
    max_drop: float = 0.01
    sign_key: Path | None = None
    progress: bool = True
    golden: int = DEFAULT_GOLDEN
    # detect: the decoder spec as given (see ``bundle.resolve_decoder``)
    decoder: dict[str, Any] | None = None
    # --input-shape: a Keras model's dynamic input dims fixed for conversion; a PyTorch
    # factory's or TorchScript's example input (NCHW for images)
    input_shape: list[int] | None = None
    # PyTorch sources: the module's image layout (converted to NHWC edges when nchw)
    input_layout: InputLayout = "nchw"


def run_convert(opts: ConvertOptions) -> dict[str, Any]:
    """Convert and publish; returns the summary that ``--json`` prints."""
    torch_source = is_torch_source(opts.model)
    if torch_source:
        check_torch_source(opts.model)
        check_torch_quantization(opts.quantization)
    else:
        check_model_path(opts.model)
    check_destination(opts.out)
    name = check_name(opts.name or _default_name(opts.model), "name")
    version = check_name(opts.version, "version")
    if opts.samples < 1:
        raise ConverterError("--samples must be at least 1")
    check_golden_count(opts.golden)
    needs_calib = opts.quantization in ("int8", "int8-float-io")
    if needs_calib and opts.calib is None:
        raise ConverterError(f"--quant {opts.quantization} needs calibration data (--calib)")
    for data in (opts.calib, opts.val):
        if data is not None and not data.exists():
            raise ConverterError(f"{data}: not found")
    labels = read_labels(opts.labels) if opts.labels else None
    key = load_signing_key(opts.sign_key)

    source: SourceModel | TorchSourceModel = (
        load_torch_source(opts.model, opts.input_shape, opts.input_layout)
        if torch_source
        else load_source_model(opts.model, opts.input_shape)
    )
    if source.output_shapes:
        check_labels(labels, source.output_shapes[0], opts.task)
    calibration = None
    calib_x = None
    if opts.calib is not None and needs_calib:
        calib = load_dataset(opts.calib, source.input_shape, opts.preprocess).subset(opts.samples)
        calib_x = calib.x
        calibration = Calibration(samples=len(calib), sha256=calib.sha256())
    validation = load_dataset(opts.val, source.input_shape, opts.preprocess) if opts.val else None

    with ProgressBar.for_terminal(
        "calibrate",
        len(calib_x) if calib_x is not None else 1,
        opts.progress and calib_x is not None,
    ) as bar:
        model = _convert(source, opts.quantization, calib_x, bar)
    float_model = _convert(source, None)
    try:
        loaded = load_model(model)
    except LoaderError as exc:
        raise ConverterError(f"the converted model does not load: {exc}") from None

    decoder = resolve_decoder(opts.task, opts.decoder, loaded.outputs)
    evaluation: Evaluation | None = None
    reference = None
    if validation is not None:
        with ProgressBar.for_terminal("validate", len(validation), opts.progress) as bar:
            tflite_out = run_tflite(loaded, validation.x, bar)
        float_out = source.predict(validation.x)
        evaluation = compare(float_out, tflite_out, validation.y, opts.task in CLASS_TASKS)
        evaluation.check_gate(opts.max_drop)
        reference = reference_of(
            opts.task,
            loaded.outputs,
            tflite_out,
            decoder,
            inputs=loaded.inputs,
            layout=opts.preprocess.layout,
            labels=labels,
        )
    golden_x = validation.x if validation is not None else calib_x
    golden = (
        golden_of(model, loaded, golden_x, opts.golden, quantization=opts.quantization)
        if golden_x is not None
        else None
    )

    spec = BundleSpec(name, version, opts.task, labels, opts.preprocess, opts.decoder)
    manifest = build_manifest(
        model,
        spec,
        opts.quantization,
        metrics=evaluation.to_metrics() if evaluation else None,
        calibration=calibration,
        reference=reference,
        golden=golden,
    )
    bundle = publish(opts.out, model, manifest, key)
    return summary(bundle, manifest, len(float_model), evaluation, signed=key is not None)


def _convert(
    source: SourceModel | TorchSourceModel,
    quantization: Quantization | None,
    calibration: Any = None,
    progress: ProgressBar | None = None,
) -> bytes:
    if isinstance(source, TorchSourceModel):
        return convert_torch(source, quantization, calibration, progress)
    return convert(source, quantization, calibration, progress)


def _default_name(model: Path) -> str:
    """The file's stem; for ``module:factory``, the factory's name."""
    return str(model).rpartition(":")[2] if is_factory(model) else model.stem


def summary(
    bundle: Path,
    manifest: dict[str, Any],
    float_model_bytes: int,
    evaluation: Evaluation | None,
    *,
    signed: bool,
) -> dict[str, Any]:
    size = int(manifest["model"]["size"])
    metrics = manifest.get("metrics") or {}
    calibration = manifest.get("calibration") or {}
    reference = manifest.get("reference") or {}
    golden = manifest.get("golden") or {}
    return {
        "bundle": str(bundle),
        "name": manifest["name"],
        "version": manifest["version"],
        "quantization": manifest["quantization"],
        "model_bytes": size,
        "float_model_bytes": float_model_bytes,
        "size_ratio": round(size / float_model_bytes, 4),
        "float_accuracy": metrics.get("float_accuracy"),
        "int8_accuracy": metrics.get("int8_accuracy"),
        "accuracy_drop": metrics.get("accuracy_drop"),
        "top1_agreement": metrics.get("top1_agreement"),
        "sqnr_db": metrics.get("sqnr_db", []),
        "validation_samples": metrics.get("samples", 0),
        "calibration_samples": calibration.get("samples", 0),
        "reference_samples": reference.get("samples", 0),
        "golden_samples": len(golden.get("samples", [])),
        "input_dtype": manifest["inputs"][0]["dtype"],
        "output_dtype": manifest["outputs"][0]["dtype"],
        "sha256": manifest["model"]["sha256"],
        "signed": signed,
        "gate_applied": evaluation is not None and evaluation.accuracy_drop is not None,
    }
