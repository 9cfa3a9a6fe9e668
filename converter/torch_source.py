"""PyTorch sources for ``edge-convert convert``, converted with litert-torch.

Three ways to name a model: an exported program (``.pt2``, from ``torch.export.save``), a
``module:factory`` callable that returns the ``nn.Module`` (``--input-shape`` gives its
example input), or TorchScript (``.pt``, ``.ts``: turned into an exported program with
``torch._export.converter.TS2EPConverter``, which is private API; ``--input-shape`` too).

PyTorch images are NCHW. The converted model takes and gives NHWC at its edges
(``litert_torch.to_channel_last_io`` on every rank-4 input and output), the layout of every
TFLite runtime and of the agent's pre-processing, so a device serves it like any other
model and the manifest says ``NHWC``; ``--input-layout nhwc`` is for a module that is
channel-last already. The data (``--calib``, ``--val``) is NHWC like a camera's frames; the
data loader transposes NCHW arrays.

Quantisation is PT2E (``torch.export``, prepare, calibrate by running the calibration data
through the observed graph, convert), lowered by litert-torch. ``int8`` gives int8 input and
output tensors; ``dynamic`` int8 weights with float activations; ``float16`` float16 weights
(ai-edge-quantizer's float casting of the float model; litert-torch brings it). Neither gives
int8 with float input/output: that mode is refused with one line.

torch and litert-torch are imported only here, only for PyTorch sources: they are the
``torch`` extra, which neither a device nor a Keras-only workstation installs.
"""

from __future__ import annotations

import importlib
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter.errors import ConverterError, UnquantizableOps, first_line
from converter.flatbuffer import read_flatbuffer
from converter.progress import ProgressBar
from converter.tfimport import quiet_fds

TorchKind = Literal["exported", "torchscript", "factory"]
InputLayout = Literal["nchw", "nhwc"]
EXPORTED_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
# ``package.module:callable``: a dotted import path, a colon, a name.
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
UNSUPPORTED_QUANT = {
    "int8-float-io": "litert-torch and ai-edge-quantizer give int8 input and output tensors",
}
INSTALL_HINT = (
    "install the torch extra: make setup-torch, or pip install -c constraints/torch.txt "
    "'edge-deploy[converter,torch]'"
)


def is_factory(path: Path) -> bool:
    """Whether ``path`` is a ``module:factory`` (and not a file of that name)."""
    return FACTORY.match(str(path)) is not None and not path.exists()


def is_torch_source(path: Path) -> bool:
    """Whether ``path`` names a PyTorch model (by suffix, or as ``module:factory``)."""
    return path.suffix.lower() in EXPORTED_SUFFIXES + TORCHSCRIPT_SUFFIXES or is_factory(path)


def check_torch_source(path: Path) -> TorchKind:
    """The cheap checks, before torch is imported."""
    if is_factory(path):
        return "factory"
    if not path.exists():
        raise ConverterError(f"{path}: not found")
    if path.is_dir():
        raise ConverterError(f"{path}: is a directory, not a PyTorch model file")
    if not zipfile.is_zipfile(path):
        raise ConverterError(f"{path}: not a PyTorch model (a {path.suffix} file is a zip archive)")
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        return "exported"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any("/code/" in name for name in names):
        # torch.save(model.state_dict()) makes the same zip without code: weights, no model.
        raise ConverterError(
            f"{path}: holds weights without a model (a state_dict or a pickled module, not "
            "TorchScript): name a function that builds the model and loads them, as "
            "module:factory"
        )
    return "torchscript"


def check_torch_quantization(quantization: str | None) -> None:
    """Refuse, in one line, a mode litert-torch cannot give."""
    if quantization in UNSUPPORTED_QUANT:
        raise ConverterError(
            f"--quant {quantization} is not supported for PyTorch models "
            f"({UNSUPPORTED_QUANT[quantization]}): use int8, dynamic or float16"
        )


def import_torch() -> tuple[Any, Any]:
    """torch and litert_torch, or one line saying how to install them."""
    try:
        with quiet_fds():
            # torch first, so that a missing torch is named as such
            torch = importlib.import_module("torch")
            litert_torch = importlib.import_module("litert_torch")
    except ImportError as exc:
        missing = exc.name or "torch"
        raise ConverterError(
            f"PyTorch models need {missing}, not installed: {INSTALL_HINT}"
        ) from None
    return torch, litert_torch


@dataclass
class TorchSourceModel:
    """A float PyTorch model behind its channel-last edges, with a batch-1 input shape."""

    path: Path
    kind: TorchKind
    module: Any  # takes and gives channel-last tensors when ``layout`` is nchw
    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]
    layout: InputLayout

    def predict(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for every sample, one sample at a time: an exported program is
        specialised to its example's batch of 1."""
        torch, _ = import_torch()
        rows: list[list[np.ndarray]] = []
        with torch.no_grad():
            for i in range(len(x)):
                outputs = _flat(self.module(torch.from_numpy(np.ascontiguousarray(x[i : i + 1]))))
                rows.append([t.detach().numpy() for t in outputs])
        return [np.concatenate(parts) for parts in zip(*rows, strict=True)]


def load_torch_source(
    path: Path, input_shape: list[int] | None = None, layout: InputLayout = "nchw"
) -> TorchSourceModel:
    """The model ``path`` names; ``input_shape`` as PyTorch takes it (NCHW for images)."""
    kind = check_torch_source(path)
    torch, litert_torch = import_torch()
    if input_shape is not None and input_shape[0] != 1:
        raise ConverterError(f"{path}: --input-shape must have batch 1, not {input_shape[0]}")
    if kind == "exported":
        module, shape = _exported(torch, path, input_shape)
    elif kind == "torchscript":
        module, shape = _torchscript(torch, path, input_shape)
    else:
        module, shape = _factory(torch, path, input_shape)
    example = torch.zeros(shape)
    outputs = _run(torch, path, module, example)
    if layout == "nchw" and len(shape) == 4:
        last = [i for i, t in enumerate(outputs) if t.dim() == 4]
        module = litert_torch.to_channel_last_io(module, args=[0], outputs=last)
        outputs = _run(torch, path, module, example.permute(0, 2, 3, 1))
        shape = [shape[0], shape[2], shape[3], shape[1]]
    return TorchSourceModel(
        path=path,
        kind=kind,
        module=module,
        input_shape=tuple(shape),
        output_shapes=[tuple(int(d) for d in t.shape) for t in outputs],
        layout=layout,
    )


def _exported(torch: Any, path: Path, input_shape: list[int] | None) -> tuple[Any, list[int]]:
    try:
        with quiet_fds():
            program = torch.export.load(str(path))
    except Exception as exc:  # a bad archive raises anything from RuntimeError to KeyError
        raise ConverterError(
            f"{path}: not a loadable exported program ({first_line(exc)})"
        ) from None
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        raise ConverterError(f"{path}: models with {len(names)} inputs are not supported")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    declared = list(node.meta["val"].shape)
    if input_shape is None:
        if not all(isinstance(d, int) for d in declared):
            raise ConverterError(
                f"{path}: input shape {[str(d) for d in declared]} is dynamic: give --input-shape"
            )
        input_shape = [int(d) for d in declared]
    return program.module(), list(input_shape)


def _torchscript(torch: Any, path: Path, input_shape: list[int] | None) -> tuple[Any, list[int]]:
    if input_shape is None:
        raise ConverterError(f"{path}: TorchScript holds no example input: give --input-shape")
    try:
        with quiet_fds():
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ConverterError(f"{path}: not loadable TorchScript ({first_line(exc)})") from None
    scripted.eval()
    try:
        from torch._export.converter import TS2EPConverter

        with quiet_fds():
            program = TS2EPConverter(scripted, (torch.zeros(input_shape),)).convert()
    except Exception as exc:
        raise ConverterError(
            f"{path}: TorchScript does not convert to an exported program ({first_line(exc)}); "
            "export the module with torch.export.save instead"
        ) from None
    return program.module(), list(input_shape)


def _factory(torch: Any, spec: Path, input_shape: list[int] | None) -> tuple[Any, list[int]]:
    module_name, _, attr = str(spec).partition(":")
    if input_shape is None:
        raise ConverterError(f"{spec}: a factory gives no example input: give --input-shape")
    # As `python -m` does: the working directory's modules can be named.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ConverterError(f"{spec}: cannot import {module_name} ({first_line(exc)})") from None
    except AttributeError:
        raise ConverterError(f"{spec}: {module_name} has no {attr}") from None
    try:
        model = factory()
    except Exception as exc:  # the user's code
        raise ConverterError(f"{spec}: {attr}() failed ({first_line(exc)})") from None
    if not isinstance(model, torch.nn.Module):
        raise ConverterError(f"{spec}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model.eval(), list(input_shape)


def _run(torch: Any, path: Path, module: Any, example: Any) -> list[Any]:
    try:
        with torch.no_grad(), quiet_fds():
            return _flat(module(example))
    except ConverterError:
        raise
    except Exception as exc:  # the model rejects the shape
        raise ConverterError(
            f"{path}: the model does not run on an input of shape {list(example.shape)} "
            f"({first_line(exc)})"
        ) from None


def _flat(result: Any) -> list[Any]:
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _flat(item)]
    if not hasattr(result, "detach"):
        raise ConverterError(f"the model returned {type(result).__name__}, not tensors")
    return [result]


def convert_torch(
    source: TorchSourceModel,
    quantization: str | None,
    calibration: np.ndarray | None = None,
    progress: ProgressBar | None = None,
) -> bytes:
    """The .tflite bytes; ``quantization=None`` gives the plain float32 model."""
    check_torch_quantization(quantization)
    torch, litert_torch = import_torch()
    example = (torch.zeros(source.input_shape),)
    try:
        if quantization in (None, "float16"):
            with quiet_fds():
                edge = litert_torch.convert(source.module, example)
        else:
            edge = _quantised(torch, litert_torch, source, quantization, calibration, progress)
        with quiet_fds():  # the flatbuffer is written now, with litert-torch's progress lines
            data = bytes(edge.model_content())
            if quantization == "float16":
                data = _float16_weights(data)
    except ConverterError:
        raise
    except Exception as exc:  # litert-torch raises whatever torch.export or MLIR raised
        raise ConverterError(f"conversion failed: {first_line(exc)}") from None
    if quantization == "int8":
        flat = read_flatbuffer(data)
        float_ops = flat.float_ops()
        if float_ops:
            raise UnquantizableOps(float_ops)
    return data


def _quantised(
    torch: Any,
    litert_torch: Any,
    source: TorchSourceModel,
    quantization: str,
    calibration: np.ndarray | None,
    progress: ProgressBar | None,
) -> Any:
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    dynamic = quantization == "dynamic"
    if not dynamic and (calibration is None or len(calibration) == 0):
        raise ConverterError(f"--quant {quantization} needs calibration data (--calib)")
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    example = (torch.zeros(source.input_shape),)
    with quiet_fds():
        graph = torch.export.export(source.module, example).module()
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        if calibration is None or dynamic:
            graph(*example)  # per-channel weight observers need one pass
        else:
            for i in range(len(calibration)):
                graph(torch.from_numpy(np.ascontiguousarray(calibration[i : i + 1])))
                if progress is not None:
                    progress.advance()
    with quiet_fds():
        graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
        config = QuantConfig(pt2e_quantizer=quantizer)
        return litert_torch.convert(graph, example, quant_config=config)


def _float16_weights(float_model: bytes) -> bytes:
    """The float model with its weights stored as float16 (dequantised at load)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.quantizer import Quantizer

    quantizer = Quantizer(float_model)
    quantizer.update_quantization_recipe(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=16, dtype=qtyping.TensorDataType.FLOAT
            ),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        ),
        algorithm_key=AlgorithmName.FLOAT_CASTING,
    )
    result = quantizer.quantize(enable_progress_report=False)
    if result.quantized_model is None:
        raise ConverterError("float16 conversion gave no model")
    return bytes(result.quantized_model)
