"""The validation child runs a bundle's golden samples on the device's runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.models import manifest as mf
from agent.models.validate import ValidationFailed, Validator
from agent.protocol import ReplyCode
from tests.converter_support import build_digits_bundle
from tests.health_support import perturbed_golden
from tests.lifecycle_support import RUNTIMES, Keys, make_keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> mf.Bundle:
    return mf.read_bundle(build_digits_bundle(tmp_path_factory.mktemp("b") / "digits", "1"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_converters_golden_samples_pass_on_the_device_runtimes(
    runtime: str, digits: mf.Bundle
) -> None:
    report = Validator(runtime=runtime, timeout_s=30).validate(digits.model_path, digits.manifest)
    assert report.golden is not None
    assert (report.golden["samples"], report.golden["values"], report.golden["over"]) == (4, 40, 0)
    # The runtimes' own rounding: measured at most 2 steps apart on int8 models.
    assert report.golden["worst_steps"] <= 2
    assert report.golden["worst_relative"] is None  # int8 outputs only


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_outputs_beyond_the_tolerance_fail_validation_with_the_figures(
    runtime: str, digits: mf.Bundle, keys: Keys, tmp_path: Path
) -> None:
    assert digits.manifest.golden is not None
    steps = digits.manifest.golden.tolerance_steps + 5
    bad = mf.read_bundle(
        perturbed_golden(
            digits.path,
            tmp_path / "bad",
            keys.private,
            steps=steps,
            every=3,
            version=digits.manifest.version,
        )
    )
    mf.verify_bundle(bad.path, [keys.public])  # a signed bundle: only the runtime can be blamed
    with pytest.raises(ValidationFailed) as info:
        Validator(runtime=runtime, timeout_s=30).validate(bad.model_path, bad.manifest)
    assert info.value.code == ReplyCode.VALIDATION_FAILED
    message = info.value.message
    assert message.startswith("golden sample ") and "\n" not in message
    assert "checked values differ by more than 4 steps" in message
    assert f"from what {digits.manifest.golden.runtime} computed" in message
    assert info.value.data is not None
    figures = info.value.data["golden"]
    assert figures["samples"] == 4 and figures["values"] == 40
    assert figures["over"] == 16  # every third of 10 values in 4 samples
    assert figures["worst_steps"] >= steps - 2
    json.dumps(info.value.data, allow_nan=False)  # fit for a reply


def test_a_difference_within_the_tolerance_passes(
    digits: mf.Bundle, keys: Keys, tmp_path: Path
) -> None:
    near = mf.read_bundle(
        perturbed_golden(
            digits.path,
            tmp_path / "near",
            keys.private,
            steps=2,
            every=3,
            version=digits.manifest.version,
        )
    )
    report = Validator(timeout_s=30).validate(near.model_path, near.manifest)
    assert report.golden is not None and report.golden["over"] == 0
    assert report.golden["worst_steps"] == 2


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda g: g["samples"][0]["inputs"][0].update(data="!!not base64!!"),
            "golden samples unusable: golden data is not base64",
        ),
        (
            lambda g: g["samples"][1]["inputs"][0].update(shape=[1, 28, 28, 1]),
            "golden sample 1 input is int8[1, 28, 28, 1], the model's int8[1, 8, 8, 1]",
        ),
        (
            lambda g: g["samples"][0]["outputs"].append(g["samples"][0]["outputs"][0]),
            "golden sample 0 has 2 outputs, the model 1",
        ),
    ],
)
def test_a_golden_block_that_cannot_be_used_is_refused_in_one_line(
    change: object, reason: str, digits: mf.Bundle
) -> None:
    data = json.loads(json.dumps(digits.manifest_data))
    change(data["golden"])  # type: ignore[operator]
    manifest = mf.parse_manifest(data)
    with pytest.raises(ValidationFailed) as info:
        Validator(timeout_s=30).validate(digits.model_path, manifest)
    assert info.value.code == ReplyCode.VALIDATION_FAILED
    assert info.value.message == reason
    assert info.value.data is None
