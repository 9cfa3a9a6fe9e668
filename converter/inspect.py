"""``edge-convert inspect``: what a .tflite or a bundle holds, without trusting the model.

Inputs and outputs come from the interpreter's input/output details (safe on every
runtime); ops, tensor types and sizes from the flatbuffer. A model the runtime
refuses is still described from the flatbuffer, with the runtime's reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from agent.models.detect_layout import suggest_task
from agent.models.golden import Golden
from agent.models.health import Reference
from agent.models.manifest import MODEL_FILE, BundleError, input_shapes, read_bundle
from agent.models.runtime import LoaderError, load_model
from converter.bundle import infer_quantization, specs_of
from converter.errors import ConverterError
from converter.flatbuffer import read_flatbuffer


def describe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConverterError(f"{path}: not found")
    info: dict[str, Any] = {"path": str(path)}
    shapes: list[list[int]] | None = None
    if path.is_dir():
        try:
            bundle = read_bundle(path)
        except BundleError as exc:
            raise ConverterError(str(exc)) from None
        m = bundle.manifest
        info["kind"] = "bundle"
        info["bundle"] = {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "quantization": m.quantization,
            "created_at": m.created_at,
            "signed": bundle.signature is not None,
            "labels": len(m.labels) if m.labels else 0,
            "metrics": m.metrics.model_dump(mode="json") if m.metrics else None,
            "producer": m.producer.model_dump(mode="json"),
            "reference": reference_summary(m.reference),
            "golden": golden_summary(m.golden),
        }
        # A bundle's dynamic inputs run at its manifest's shapes, as on a device.
        shapes = input_shapes(m)
        model_path = path / MODEL_FILE
        if not model_path.is_file():
            raise ConverterError(f"{path}: bundle has no {MODEL_FILE}")
    else:
        info["kind"] = "tflite"
        model_path = path
    data = model_path.read_bytes()
    try:
        fb = read_flatbuffer(data)
    except ConverterError as exc:
        raise ConverterError(f"{model_path}: {exc}") from None
    info.update(
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        schema_version=fb.version,
        subgraphs=fb.subgraphs,
        operators=len(fb.operators),
        op_histogram=fb.op_histogram(),
        tensor_types=dict(sorted(fb.tensor_types.items())),
        float_ops=fb.float_ops(),
    )
    try:
        loaded = load_model(data, input_shapes=shapes)
    except LoaderError as exc:
        info.update(inputs=[], outputs=[], load_error=str(exc))
        return info
    inputs, outputs = specs_of(loaded)
    info["runtime"] = str(loaded.runtime)
    info["inputs"] = [t.model_dump(mode="json") for t in inputs]
    info["outputs"] = [t.model_dump(mode="json") for t in outputs]
    for described, t in zip(info["inputs"], loaded.inputs, strict=True):
        # The runtime's shape of a dynamic input is a placeholder (1 per dynamic dim).
        described["dynamic"] = t.dynamic
        if t.dynamic:
            described["shape_signature"] = list(t.signature)
    info["quantization"] = infer_quantization(inputs, fb)
    suggested = suggest_task(outputs)
    if suggested is not None:
        task, decoder, why = suggested
        info["suggested"] = {"task": task, "decoder": decoder, "why": why}
    return info


def format_description(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}: {info['kind']}, {info['size_bytes']} bytes"]
    if "bundle" in info:
        b = info["bundle"]
        lines.append(
            f"  bundle: {b['name']} {b['version']} ({b['task']}, {b['quantization']}, "
            f"{'signed' if b['signed'] else 'unsigned'})"
        )
        if b["metrics"]:
            lines.append("  metrics: " + ", ".join(f"{k}={v}" for k, v in b["metrics"].items()))
        lines.append("  reference: " + describe_reference(b["reference"]))
        lines.append("  golden: " + describe_golden(b["golden"]))
    lines.append(f"  sha256: {info['sha256']}")
    if "load_error" in info:
        lines.append(f"  runtime refused it: {info['load_error']}")
    else:
        lines.append(f"  quantization: {info['quantization']} (runtime {info['runtime']})")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            quant = f" scale={t['scale']:.6g} zero_point={t['zero_point']}" if t["scale"] else ""
            shape, dynamic = t["shape"], ""
            if t.get("dynamic") and "bundle" in info:
                dynamic = f" (dynamic in the file: {t['shape_signature']}; run at this shape)"
            elif t.get("dynamic"):
                shape = t["shape_signature"]
                dynamic = " (dynamic: bundle it with --input-shape)"
            lines.append(f"  {kind[:-1]}: {t['name']} {t['dtype']}{shape}{quant}{dynamic}")
    if info.get("suggested"):
        s = info["suggested"]
        decoder = f" --decoder {s['decoder']}" if s["decoder"] else ""
        lines.append(f"  suggested: --task {s['task']}{decoder} ({s['why']})")
    ops = ", ".join(f"{name} x{n}" for name, n in info["op_histogram"].items())
    lines.append(f"  ops ({info['operators']} in {info['subgraphs']} subgraph(s)): {ops}")
    if info["float_ops"]:
        lines.append(f"  float32 ops: {', '.join(info['float_ops'])}")
    return "\n".join(lines)


def reference_summary(reference: Reference | None) -> dict[str, Any] | None:
    """The reference statistics in a few numbers (the manifest holds the histograms)."""
    if reference is None:
        return None
    out: dict[str, Any] = {"samples": reference.samples}
    if reference.classify is not None:
        c = reference.classify
        out.update(kind="classify", classes=c.classes, confidence_quantiles=c.confidence_quantiles)
    elif reference.detect is not None:
        d = reference.detect
        out.update(kind="detect", threshold=d.threshold, classes=len(d.score_quantiles))
    elif reference.raw is not None:
        out.update(kind="raw", mean=reference.raw.mean, std=reference.raw.std)
    return out


def golden_summary(golden: Golden | None) -> dict[str, Any] | None:
    """The golden block without its base64 data."""
    if golden is None:
        return None
    return {
        "samples": len(golden.samples),
        "runtime": golden.runtime,
        "tolerance_steps": golden.tolerance_steps,
        "tolerance_float": golden.tolerance_float,
        "bytes": sum(len(t.data) for s in golden.samples for t in (*s.inputs, *s.outputs)),
    }


def describe_reference(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "none (made without --val)"
    text = f"{summary.get('kind', '?')} outputs of {summary['samples']} samples"
    quantiles = summary.get("confidence_quantiles")
    if quantiles:
        text += f", top-1 confidence median {quantiles[len(quantiles) // 2]:.3f}"
    return text


def describe_golden(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "none"
    return (
        f"{summary['samples']} samples from {summary['runtime']}, tolerance "
        f"{summary['tolerance_steps']:g} steps / {summary['tolerance_float']:g} relative "
        f"({summary['bytes']} bytes of base64)"
    )
