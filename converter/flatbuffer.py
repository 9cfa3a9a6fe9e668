"""Reading a .tflite flatbuffer directly: operators, tensor types, versions.

The interpreter's ``get_tensor_details()`` crashes tflite-runtime 2.14 on some
published models, so anything beyond the input and output details is read from
the file here. The generated schema ships with ai-edge-litert (and TensorFlow);
neither import loads an interpreter or TensorFlow itself.
"""

from __future__ import annotations

import importlib.util
import struct
from collections import Counter
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from converter.errors import ConverterError

TFLITE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class Operator:
    name: str
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]


@dataclass(frozen=True)
class ModelFlatbuffer:
    version: int
    description: str
    subgraphs: int
    operators: list[Operator]
    tensor_types: Counter[str]

    def op_histogram(self) -> dict[str, int]:
        counts = Counter(op.name for op in self.operators)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def float_ops(self) -> list[str]:
        """Ops that compute in float32 (conversion ops at the model's edges excepted)."""
        return sorted(
            {
                op.name
                for op in self.operators
                if op.name not in ("QUANTIZE", "DEQUANTIZE")
                and "FLOAT32" in op.input_types + op.output_types
            }
        )


@cache
def _schema() -> ModuleType:
    try:
        from ai_edge_litert import schema_py_generated

        return schema_py_generated
    except ImportError:
        pass
    # TensorFlow's copy, loaded by path: importing the package would load all of TensorFlow.
    spec = importlib.util.find_spec("tensorflow")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = f"{root}/lite/python/schema_py_generated.py"
        file_spec = importlib.util.spec_from_file_location("_tflite_schema", candidate)
        if file_spec and file_spec.loader:
            try:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                return module
            except (OSError, ImportError):
                continue
    raise ConverterError("reading .tflite files needs ai-edge-litert or tensorflow installed")


def _names(enum: Any) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def _indices(vector: Any) -> list[int]:
    # The generated accessors return 0, not an empty array, for an absent vector.
    return [] if isinstance(vector, int) else [int(i) for i in vector]


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == TFLITE_IDENTIFIER


def read_flatbuffer(data: bytes) -> ModelFlatbuffer:
    if not is_tflite(data):
        raise ConverterError("not a TFLite model (no TFL3 flatbuffer identifier)")
    s = _schema()
    op_names = _names(s.BuiltinOperator)
    type_names = _names(s.TensorType)
    try:
        model = s.Model.GetRootAsModel(data, 0)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            # Newer files keep builtins > 127 in builtin_code; older ones only the deprecated field.
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = op_names.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM" and oc.CustomCode():
                name = f"CUSTOM:{oc.CustomCode().decode('utf-8', 'replace')}"
            codes.append(name)
        operators: list[Operator] = []
        tensor_types: Counter[str] = Counter()
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            types = [
                type_names.get(graph.Tensors(t).Type(), "UNKNOWN")
                for t in range(graph.TensorsLength())
            ]
            tensor_types.update(types)
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                operators.append(
                    Operator(
                        name=codes[op.OpcodeIndex()],
                        input_types=tuple(types[i] for i in _indices(op.InputsAsNumpy()) if i >= 0),
                        output_types=tuple(
                            types[i] for i in _indices(op.OutputsAsNumpy()) if i >= 0
                        ),
                    )
                )
        description = model.Description() or b""
        return ModelFlatbuffer(
            version=int(model.Version()),
            description=description.decode("utf-8", "replace"),
            subgraphs=int(model.SubgraphsLength()),
            operators=operators,
            tensor_types=tensor_types,
        )
    except (IndexError, ValueError, TypeError, AttributeError, struct.error) as exc:
        # flatbuffers raises struct/index errors on truncated or corrupt files.
        raise ConverterError(f"corrupt TFLite flatbuffer ({type(exc).__name__}: {exc})") from None
