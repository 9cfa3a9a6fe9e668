from __future__ import annotations

from pathlib import Path

import pytest

from agent.models import manifest as mf
from agent.models.validate import (
    Requirements,
    TensorShape,
    ValidationFailed,
    Validator,
)
from agent.protocol import ReplyCode
from tests.lifecycle_support import RUNTIMES, faulty_child, manifest_for


def parsed(model: Path, **over: object) -> mf.Manifest:
    return mf.parse_manifest(manifest_for(model, **over))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_good_model_passes_on_the_agents_runtime(runtime: str, tiny_int8_model: Path) -> None:
    report = Validator(runtime=runtime, timeout_s=30).validate(
        tiny_int8_model, parsed(tiny_int8_model)
    )
    assert report.runtime == runtime
    assert [(t.shape, t.dtype) for t in report.inputs] == [((1, 8, 8, 1), "int8")]
    assert [(t.shape, t.dtype) for t in report.outputs] == [((1, 10), "int8")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_file_that_is_not_a_model_is_refused_with_the_runtimes_reason(
    runtime: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all" * 20)
    with pytest.raises(ValidationFailed) as info:
        Validator(runtime=runtime).run(bad)
    assert info.value.code == ReplyCode.VALIDATION_FAILED
    assert f"{runtime} cannot load the model" in info.value.message


def test_a_model_that_kills_its_validator(tiny_int8_model: Path) -> None:
    with pytest.raises(ValidationFailed, match=r"model crashed the validator \(signal SIGABRT\)"):
        Validator(child=faulty_child("abort")).run(tiny_int8_model)


def test_a_model_that_hangs_is_killed_at_the_timeout(tiny_int8_model: Path) -> None:
    with pytest.raises(ValidationFailed, match=r"timed out after 2s.*validator killed"):
        Validator(timeout_s=2, child=faulty_child("hang")).run(tiny_int8_model)


def test_a_model_that_exhausts_memory_hits_the_limit(tiny_int8_model: Path) -> None:
    with pytest.raises(ValidationFailed, match=r"out of memory \(limit 512 MB\)"):
        Validator(memory_mb=512, child=faulty_child("oom")).run(tiny_int8_model)


def test_the_memory_limit_is_real_for_the_real_child(tiny_int8_model: Path) -> None:
    # So low that the runtime cannot even build an interpreter.
    with pytest.raises(ValidationFailed, match=r"out of memory \(limit 32 MB\)"):
        Validator(runtime="ai_edge_litert", memory_mb=32).run(tiny_int8_model)


def test_manifest_that_lies_about_the_tensors_is_incompatible(tiny_int8_model: Path) -> None:
    manifest = parsed(
        tiny_int8_model, inputs=[{"name": "x", "shape": [1, 28, 28, 1], "dtype": "int8"}]
    )
    with pytest.raises(ValidationFailed) as info:
        Validator().validate(tiny_int8_model, manifest)
    assert info.value.code == ReplyCode.INCOMPATIBLE
    assert "int8[1, 8, 8, 1] differ from the manifest's int8[1, 28, 28, 1]" in info.value.message


def test_input_that_does_not_fit_the_pipeline(
    tiny_int8_model: Path, tiny_float_model: Path
) -> None:
    pipeline = Requirements.of(parsed(tiny_int8_model))
    with pytest.raises(ValidationFailed) as info:
        Validator().validate(tiny_float_model, parsed(tiny_float_model), pipeline)
    assert info.value.code == ReplyCode.INCOMPATIBLE
    assert "do not fit the pipeline, which feeds int8[1, 8, 8, 1]" in info.value.message


def test_task_and_outputs_must_fit_the_pipeline(tiny_int8_model: Path) -> None:
    manifest = parsed(tiny_int8_model)
    with pytest.raises(ValidationFailed, match="task 'classify' does not fit"):
        Validator().validate(tiny_int8_model, manifest, Requirements(task="detect"))
    needs_two = Requirements(inputs=(TensorShape((1, 8, 8, 1), "int8"),), output_count=2)
    with pytest.raises(ValidationFailed, match="model has 1 outputs; the pipeline reads 2"):
        Validator().validate(tiny_int8_model, manifest, needs_two)
