"""``edge-convert inspect``: what a .tflite or a bundle holds, without trusting the model.

Inputs and outputs come from the interpreter's input/output details (safe on every
runtime); ops, tensor types and sizes from the flatbuffer. A model the runtime
refuses is still described from the flatbuffer, with the runtime's reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from agent.models.manifest import MODEL_FILE, BundleError, read_bundle
from agent.models.runtime import LoaderError, load_model
from converter.bundle import infer_quantization, tensor_specs
from converter.errors import ConverterError
from converter.flatbuffer import read_flatbuffer


def describe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConverterError(f"{path}: not found")
    info: dict[str, Any] = {"path": str(path)}
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
        }
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
        inputs, outputs = tensor_specs(data)
        info["runtime"] = str(load_model(data).runtime)
    except (ConverterError, LoaderError) as exc:
        info.update(inputs=[], outputs=[], load_error=str(exc))
        return info
    info["inputs"] = [t.model_dump(mode="json") for t in inputs]
    info["outputs"] = [t.model_dump(mode="json") for t in outputs]
    info["quantization"] = infer_quantization(inputs, fb)
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
    lines.append(f"  sha256: {info['sha256']}")
    if "load_error" in info:
        lines.append(f"  runtime refused it: {info['load_error']}")
    else:
        lines.append(f"  quantization: {info['quantization']} (runtime {info['runtime']})")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            quant = f" scale={t['scale']:.6g} zero_point={t['zero_point']}" if t["scale"] else ""
            lines.append(f"  {kind[:-1]}: {t['name']} {t['dtype']}{t['shape']}{quant}")
    ops = ", ".join(f"{name} x{n}" for name, n in info["op_histogram"].items())
    lines.append(f"  ops ({info['operators']} in {info['subgraphs']} subgraph(s)): {ops}")
    if info["float_ops"]:
        lines.append(f"  float32 ops: {', '.join(info['float_ops'])}")
    return "\n".join(lines)
