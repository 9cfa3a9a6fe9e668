"""Raw outputs: whole values up to ``pipelines[].raw.max_values``, a summary past it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import ConfigError, PipelineConfig, parse_config
from agent.loops.postprocess import DEFAULT_RAW_VALUES, FrameContext, RawOutputs
from agent.loops.processing import build_processing
from agent.models import runtime as rt
from agent.models.manifest import Manifest, ModelFile, Producer, TensorSpec
from agent.models.runtime import TensorInfo
from tests.device_venv import DEVICE_RUNTIMES


def tensor(
    shape: tuple[int, ...], dtype: str = "float32", scale: float = 0.0, zp: int = 0
) -> TensorInfo:
    return TensorInfo("t", 0, shape, dtype, scale, zp)


def test_an_output_within_the_cap_goes_out_whole() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3) / 4
    [out] = RawOutputs([tensor((1, 2, 3))], max_values=6)([x], FrameContext()).raw or []
    assert out.shape == [1, 2, 3] and out.values == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert out.min is None and out.argmax is None


def test_a_larger_float_output_is_summarised_as_numpy_sees_it() -> None:
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    result = RawOutputs([tensor(x.shape)], max_values=100)([x], FrameContext())
    [out] = result.raw or []
    assert out.values is None and out.shape == [1, 16, 16, 3]
    assert out.min == pytest.approx(float(x.min()), abs=1e-6)
    assert out.max == pytest.approx(float(x.max()), abs=1e-6)
    assert out.mean == pytest.approx(float(x.astype(np.float64).mean()), abs=1e-6)
    assert out.argmax == int(np.argmax(x))
    # Drift and shadow still get the whole tensor.
    assert result.tensors is not None and np.array_equal(result.tensors[0], x)


def test_int8_summary_is_taken_on_the_codes_and_dequantised() -> None:
    t = tensor((1, 40, 40), "int8", scale=0.05, zp=-3)
    codes = np.random.default_rng(1).integers(-128, 128, (1, 40, 40)).astype(np.int8)
    real = (codes.astype(np.float64) + 3) * 0.05
    [out] = RawOutputs([t], max_values=64)([codes], FrameContext()).raw or []
    assert out.values is None
    assert out.min == pytest.approx(real.min(), abs=1e-6)
    assert out.max == pytest.approx(real.max(), abs=1e-6)
    assert out.mean == pytest.approx(real.mean(), abs=1e-6)
    assert out.argmax == int(np.argmax(real))


def test_outputs_are_capped_one_by_one() -> None:
    small = np.array([[2, 6]], np.int8)
    big = np.zeros((1, 65), np.float32)
    big[0, 9] = 3.0
    raw = RawOutputs([tensor((1, 2), "int8", 0.25, 2), tensor((1, 65))])(
        [small, big], FrameContext()
    ).raw
    assert raw is not None and [r.values for r in raw] == [[0.0, 1.0], None]
    assert (raw[1].argmax, raw[1].max, raw[1].min) == (9, 3.0, 0.0)


def test_zero_cap_summarises_everything() -> None:
    [out] = (
        RawOutputs([tensor((1,))], max_values=0)([np.array([1.5], np.float32)], FrameContext()).raw
        or []
    )
    assert out.values is None and (out.min, out.max, out.mean, out.argmax) == (1.5, 1.5, 1.5, 0)


# ----------------------------------------------------------------------------- config


def _config(raw: object = None) -> dict[str, object]:
    pipeline: dict[str, object] = {"name": "p", "model": "m", "source": {"type": "synthetic"}}
    if raw is not None:
        pipeline["raw"] = raw
    return {
        "device": {"id": "dev"},
        "models": {"require_signature": False},
        "pipelines": [pipeline],
    }


def test_config_default_and_bounds() -> None:
    assert parse_config(_config()).pipelines[0].raw.max_values == DEFAULT_RAW_VALUES
    assert parse_config(_config({"max_values": 0})).pipelines[0].raw.max_values == 0
    for bad in ({"max_values": -1}, {"max_values": 100_000}, {"max_values": "8"}, {"cap": 8}):
        with pytest.raises(ConfigError) as err:
            parse_config(_config(bad))
        assert "pipelines.p.raw" in str(err.value)


# ------------------------------------------------------------------- a real model


def _manifest(model: Path) -> Manifest:
    loaded = rt.load_model(model, runtime="ai_edge_litert")

    def specs(tensors: list[TensorInfo]) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=t.name,
                shape=list(t.shape),
                dtype=t.dtype,
                scale=t.scale,
                zero_point=t.zero_point,
            )
            for t in tensors
        ]

    return Manifest(
        name="tiny", version="1", created_at="2026-01-01T00:00:00Z", task="raw",
        quantization="int8", model=ModelFile(sha256="0" * 64, size=1),
        inputs=specs(loaded.inputs), outputs=specs(loaded.outputs),
        producer=Producer(converter="test"),
    )  # fmt: skip


@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_pipeline_builds_raw_processing_with_the_configured_cap(
    tiny_int8_model: Path, runtime: str
) -> None:
    """The tiny int8 classifier's 10 int8 outputs, served as a raw model."""
    manifest = _manifest(tiny_int8_model)
    loaded = rt.load_model(tiny_int8_model, runtime=runtime, num_threads=1)
    frame = np.random.default_rng(2).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    outputs = []
    for cap in (64, 4):
        config = PipelineConfig.model_validate(
            {"name": "p", "model": "tiny", "source": {"type": "synthetic"},
             "raw": {"max_values": cap}}
        )  # fmt: skip
        proc = build_processing("1", manifest, loaded, config)
        tensor, transform = proc.pre(frame)
        loaded.interpreter.set_tensor(proc.input_index, tensor)
        loaded.interpreter.invoke()
        codes = [loaded.interpreter.get_tensor(o.index) for o in loaded.outputs]
        outputs.append((proc.post(codes, FrameContext(transform=transform)), codes[0]))
    (whole, codes), (summary, _) = outputs
    t = loaded.outputs[0]
    real = t.dequantize(codes).reshape(-1)
    [w] = whole.raw or []
    [s] = summary.raw or []
    assert w.shape == [1, 10] and w.values == pytest.approx(real.tolist(), abs=1e-6)
    assert s.values is None and s.shape == [1, 10]
    assert (s.min, s.max) == (pytest.approx(real.min()), pytest.approx(real.max()))
    assert s.mean == pytest.approx(float(real.astype(np.float64).mean()), abs=1e-5)
    assert s.argmax == int(np.argmax(codes))
