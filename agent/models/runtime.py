"""One loader for TFLite interpreters, whichever runtime is installed.

Preference order for ``auto``, fastest first as measured on x86_64 and aarch64:
``ai_edge_litert`` (LiteRT), ``tflite_runtime`` (the Pi images' runtime; its int8
kernels are far slower on x86_64), then ``tensorflow`` (a workstation only; a
device never installs it).

Only input and output details are read here: ``get_tensor_details()`` crashes
tflite-runtime 2.14 on some published models.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

RuntimeName = Literal["ai_edge_litert", "tflite_runtime", "tensorflow"]
RUNTIMES: tuple[RuntimeName, ...] = ("ai_edge_litert", "tflite_runtime", "tensorflow")
EDGETPU_LIBRARY = "libedgetpu.so.1"

# (module with Interpreter, attribute path inside it, module with __version__)
_MODULES = {
    "ai_edge_litert": ("ai_edge_litert.interpreter", "", "ai_edge_litert"),
    "tflite_runtime": ("tflite_runtime.interpreter", "", "tflite_runtime"),
    # `import tensorflow.lite` gives the package, not the tf.lite API with Interpreter.
    "tensorflow": ("tensorflow", "lite", "tensorflow"),
}


class LoaderError(Exception):
    """Base of the loader's errors; the message is one line naming the cause."""


class RuntimeUnavailable(LoaderError):
    """The requested runtime (or any runtime) is not installed."""


class DelegateUnavailable(LoaderError):
    """A delegate's shared library could not be loaded."""


class ModelLoadError(LoaderError):
    """The runtime refused the model (not a TFLite file, unresolved custom op, ...)."""


@dataclass(frozen=True)
class Runtime:
    """An importable runtime: its name, version and the module with ``Interpreter``."""

    name: RuntimeName
    version: str
    module: Any

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class TensorInfo:
    """What a pipeline needs to know of an input or output tensor."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int
    # The file's shape signature: -1 where a dim is dynamic; empty when the runtime
    # gives none (then it is ``shape``).
    signature: tuple[int, ...] = ()

    @property
    def dynamic(self) -> bool:
        """Whether a dim past the batch dim is dynamic: the model needs a shape given
        (a dynamic batch alone runs as 1)."""
        return any(d < 0 for d in self.signature[1:])

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Real values to this tensor's dtype, through its scale and zero point if quantised."""
        dtype = np.dtype(self.dtype)
        if not self.quantized or dtype.kind == "f":
            return x.astype(dtype)
        limits = np.iinfo(dtype)
        codes = np.round(x / self.scale + self.zero_point)
        return np.clip(codes, limits.min, limits.max).astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """This tensor's values as float32 real values."""
        if not self.quantized:
            return q.astype(np.float32, copy=False)
        return (q.astype(np.float32) - self.zero_point) * np.float32(self.scale)

    @classmethod
    def from_detail(cls, d: dict[str, Any]) -> TensorInfo:
        scale, zero_point = d.get("quantization", (0.0, 0))
        signature = d.get("shape_signature")
        return cls(
            name=str(d["name"]),
            index=int(d["index"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=d["dtype"].__name__ if hasattr(d["dtype"], "__name__") else str(d["dtype"]),
            scale=float(scale),
            zero_point=int(zero_point),
            signature=tuple(int(x) for x in signature) if signature is not None else (),
        )


def fits(signature: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether ``shape`` is one the signature allows: same rank, fixed dims equal."""
    return len(signature) == len(shape) and all(
        s < 0 or s == d for s, d in zip(signature, shape, strict=True)
    )


def fit_inputs(interpreter: Any, shapes: Sequence[Sequence[int]] | None) -> None:
    """Resize each input with dynamic dims past the batch to the given shape (the
    manifest's), before ``allocate_tensors``. Other inputs are left alone: the manifest
    check at validation reports a mismatch (``incompatible``). Raises ``ModelLoadError``
    for a shape a dynamic input cannot take."""
    if not shapes:
        return
    for detail, shape in zip(interpreter.get_input_details(), shapes, strict=False):
        info = TensorInfo.from_detail(detail)
        wanted = [int(d) for d in shape]
        # A dynamic batch alone is left at 1, as every runtime allocates it.
        if not info.dynamic or list(info.shape) == wanted:
            continue
        if not fits(info.signature, wanted) or min(wanted, default=1) < 1:
            raise ModelLoadError(
                f"input {info.name!r} shape {list(info.signature)} cannot take the shape {wanted}"
            )
        interpreter.resize_tensor_input(info.index, wanted)


@dataclass
class LoadedModel:
    """An allocated interpreter with its tensors described. Owned by one thread."""

    interpreter: Any
    runtime: Runtime
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    delegate: str


def import_runtime(name: RuntimeName) -> Runtime:
    interp_module, attribute, top = _MODULES[name]
    try:
        module = importlib.import_module(interp_module)
        if attribute:
            module = getattr(module, attribute)
        version = str(getattr(importlib.import_module(top), "__version__", "unknown"))
    except (ImportError, AttributeError) as exc:
        raise RuntimeUnavailable(f"runtime {name} is not installed ({exc})") from None
    return Runtime(name=name, version=version, module=module)


def available_runtimes() -> list[Runtime]:
    """Every runtime that imports here, fastest first."""
    found = []
    for name in RUNTIMES:
        try:
            found.append(import_runtime(name))
        except RuntimeUnavailable:
            continue
    return found


def select_runtime(prefer: str = "auto") -> Runtime:
    """The runtime named by ``prefer``, or with ``auto`` the fastest installed one."""
    if prefer != "auto":
        if prefer not in RUNTIMES:
            raise RuntimeUnavailable(
                f"unknown runtime {prefer!r}; expected auto or one of {', '.join(RUNTIMES)}"
            )
        return import_runtime(prefer)
    for name in RUNTIMES:
        try:
            return import_runtime(name)
        except RuntimeUnavailable:
            continue
    raise RuntimeUnavailable(
        "no TFLite runtime installed: pip install 'edge-deploy[litert]' or 'edge-deploy[tflite]'"
    )


def _load_delegate(
    runtime: Runtime, delegate: str, path: Path | None, options: dict[str, str]
) -> Any | None:
    if delegate == "cpu":
        return None
    library = EDGETPU_LIBRARY if delegate == "edgetpu" else str(path or "")
    if delegate == "external" and not library:
        raise DelegateUnavailable("delegate 'external' needs a delegate_path")
    hint = " (install libedgetpu1-std)" if delegate == "edgetpu" else ""
    try:
        # Probe with ctypes first: the runtimes' own failure path leaves a half-built
        # Delegate whose destructor raises.
        ctypes.CDLL(library)
    except OSError as exc:
        raise DelegateUnavailable(
            f"cannot load {delegate} delegate library {library}{hint}: {exc}"
        ) from None
    load = getattr(runtime.module, "load_delegate", None)
    if load is None:  # tf.lite keeps it under experimental
        load = runtime.module.experimental.load_delegate
    try:
        return load(library, options or None)
    except (ValueError, OSError, RuntimeError) as exc:
        raise DelegateUnavailable(
            f"cannot load {delegate} delegate library {library}{hint}: {exc}"
        ) from None


def probe_delegate(
    runtime: Runtime,
    delegate: str,
    delegate_path: Path | None = None,
    delegate_options: dict[str, str] | None = None,
) -> None:
    """Load the configured delegate once and drop it (``edge-agent check``).

    Raises ``DelegateUnavailable`` naming the library, as ``load_model`` would.
    """
    _load_delegate(runtime, delegate, delegate_path, delegate_options or {})


def load_model(
    model: str | os.PathLike[str] | bytes,
    *,
    runtime: str | Runtime = "auto",
    num_threads: int = 1,
    delegate: str = "cpu",
    delegate_path: Path | None = None,
    delegate_options: dict[str, str] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> LoadedModel:
    """Build an interpreter for ``model`` (a path or the file's bytes) and allocate it;
    inputs with dynamic dims are first resized to ``input_shapes`` (the manifest's).

    Raises ``ModelLoadError`` when the runtime refuses the model, and
    ``RuntimeUnavailable`` / ``DelegateUnavailable`` for the environment.
    """
    rt = runtime if isinstance(runtime, Runtime) else select_runtime(runtime)
    delegates = [
        d for d in [_load_delegate(rt, delegate, delegate_path, delegate_options or {})] if d
    ]
    source: dict[str, Any] = (
        {"model_content": bytes(model)}
        if isinstance(model, bytes | bytearray)
        else {"model_path": os.fspath(model)}
    )
    try:
        interpreter = rt.module.Interpreter(
            **source, num_threads=num_threads, experimental_delegates=delegates or None
        )
        fit_inputs(interpreter, input_shapes)
        interpreter.allocate_tensors()
        inputs = [TensorInfo.from_detail(d) for d in interpreter.get_input_details()]
        outputs = [TensorInfo.from_detail(d) for d in interpreter.get_output_details()]
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{rt.name} cannot load the model: {first}") from None
    return LoadedModel(interpreter, rt, inputs, outputs, delegate)
