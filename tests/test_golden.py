"""Golden samples in the manifest: packing within a budget, restoring exactly, comparing."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from agent.models.golden import (
    Golden,
    GoldenError,
    GoldenSample,
    GoldenTensor,
    compare,
    describe_failure,
    pack_input,
    pack_output,
    reduce_input,
    unpack_input,
    unpack_output,
)

RNG = np.random.default_rng(5)


def image(shape: tuple[int, ...] = (1, 224, 224, 3)) -> np.ndarray:
    return RNG.integers(-128, 128, shape, dtype=np.int8)


def golden_of(outputs: list[np.ndarray], **over: float) -> Golden:
    sample = GoldenSample(inputs=[pack_input(image((1, 8, 8, 1)), 4096)[0]], outputs=outputs)
    return Golden(runtime="test 1.0", samples=[sample], **over)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [1 << 20, 16_000, 3_000, 1_000, 10])
def test_an_input_packed_to_a_budget_restores_to_what_the_device_feeds(budget: int) -> None:
    x = image()
    stored, full = pack_input(x, budget)
    raw = base64.b64decode(stored.data)
    # Down to one value per axis; smaller budgets cannot be met for a 3-channel image.
    assert len(raw) <= max(budget, 3)
    assert full.shape == x.shape and full.dtype == x.dtype
    restored = unpack_input(GoldenTensor.model_validate(stored.model_dump(mode="json")))
    np.testing.assert_array_equal(restored, full)
    if budget >= x.nbytes:
        assert stored.stored is None
        np.testing.assert_array_equal(full, x)
    else:
        # Every few pixels are kept as they were, and the device repeats each to fill
        # the image: kept values go back where they came from.
        reduced, _ = reduce_input(x, budget)
        assert stored.stored == list(reduced.shape) and base64.b64decode(stored.data) == raw
        repeat = math.ceil(224 / reduced.shape[1])
        np.testing.assert_array_equal(reduced, x[:, ::repeat, ::repeat])
        np.testing.assert_array_equal(full[:, ::repeat, ::repeat], reduced)
        np.testing.assert_array_equal(
            full[:, 1::repeat, ::repeat], reduced[:, : full[:, 1::repeat].shape[1]]
        )


def test_kept_values_of_a_non_square_image_go_back_where_they_were() -> None:
    x = image((1, 10, 224, 1))
    stored, full = pack_input(x, 80)  # every 6th row of 10 keeps 2: restored as 5 and 5
    assert stored.stored is not None
    rows, cols = stored.stored[1], stored.stored[2]
    kept = np.frombuffer(base64.b64decode(stored.data), np.int8).reshape(stored.stored)
    step_r, step_c = math.ceil(10 / rows), math.ceil(224 / cols)
    np.testing.assert_array_equal(kept, x[:, ::step_r, ::step_c])
    np.testing.assert_array_equal(full[:, ::step_r, ::step_c], kept)


def test_vectors_and_windows_are_reduced_along_their_one_axis() -> None:
    window = RNG.standard_normal((1, 1000, 6)).astype(np.float32)
    stored, full = pack_input(window, 4000)
    assert stored.stored is not None and stored.stored[0] == 1 and stored.stored[2] == 6
    np.testing.assert_array_equal(unpack_input(stored), full)
    vector = RNG.standard_normal((1, 5000)).astype(np.float32)
    stored, full = pack_input(vector, 1000)
    assert len(base64.b64decode(stored.data)) <= 1000
    np.testing.assert_array_equal(unpack_input(stored), full)


def test_large_outputs_are_kept_at_a_stride() -> None:
    y = RNG.integers(-128, 128, (1, 1917, 91), dtype=np.int8)
    t = pack_output(y)
    assert t.stride > 1 and t.shape == [1, 1917, 91]
    np.testing.assert_array_equal(unpack_output(t), y.reshape(-1)[:: t.stride])
    small = pack_output(np.arange(10, dtype=np.int8).reshape(1, 10))
    assert small.stride == 1


def test_quantised_outputs_compare_in_steps() -> None:
    expected = np.array([[10, -20, 30, 127, -128, 0, 1, 2, 3, 4]], np.int8)
    golden = golden_of([pack_output(expected)], tolerance_steps=4)
    same = compare(golden, 0, 0, expected.copy(), scale=0.1)
    assert (same.checked, same.over, same.worst, same.quantised) == (10, 0, 0.0, True)
    near = expected.copy()
    near[0, 0] += 4
    assert compare(golden, 0, 0, near, 0.1).over == 0
    far = expected.copy()
    far[0, 0] += 9
    far[0, 5] -= 5
    check = compare(golden, 0, 0, far, 0.1)
    assert (check.over, check.worst) == (2, 9.0)
    text = describe_failure(check, golden)
    assert text == (
        "golden sample 0 output 0: 2 of 10 checked values differ by more than 4 steps "
        "(worst 9 steps) from what test 1.0 computed"
    )


def test_float_outputs_compare_relative_to_the_outputs_range() -> None:
    expected = np.array([[0.5, -2.0, 1.0]], np.float32)
    golden = golden_of([pack_output(expected)], tolerance_float=0.01)
    assert compare(golden, 0, 0, expected + 0.019, scale=0.0).over == 0
    off = compare(golden, 0, 0, expected + np.float32(0.03), scale=0.0)
    assert off.over == 3 and not off.quantised and off.worst == pytest.approx(0.015, rel=1e-3)
    nan = expected.copy()
    nan[0, 1] = np.nan
    check = compare(golden, 0, 0, nan, 0.0)
    assert check.over == 3 and math.isinf(check.worst)
    assert "(worst not finite)" in describe_failure(check, golden)


def test_an_output_of_another_shape_or_type_is_named() -> None:
    expected = np.zeros((1, 10), np.int8)
    golden = golden_of([pack_output(expected)])
    for actual in (np.zeros((1, 12), np.int8), np.zeros((1, 10), np.uint8)):
        check = compare(golden, 0, 0, actual, 0.1)
        assert check.over == 1 and check.checked == 0
        assert describe_failure(check, golden) == (
            "golden sample 0 output 0: the output is not int8[1, 10] as when test 1.0 computed it"
        )


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"dtype": "int8", "shape": [1, 4], "data": "not base64!"}, "not base64"),
        ({"dtype": "int32", "shape": [1, 4], "data": "AAAA"}, "not a whole number of int32"),
        (
            {"dtype": "int8", "shape": [1, 4], "data": "AAAA"},
            "holds 3 values, shape [1, 4] needs 4",
        ),
        (
            {"dtype": "int8", "shape": [1, 8, 8, 1], "stored": [1, 4], "data": "AAAAAA=="},
            "cannot make [1, 8, 8, 1]",
        ),
        (
            {"dtype": "int8", "shape": [1, 8, 8, 1], "stored": [1, 0, 0, 1], "data": ""},
            "cannot make [1, 8, 8, 1]",
        ),
    ],
)
def test_undecodable_inputs_raise_one_line(tensor: dict[str, object], message: str) -> None:
    with pytest.raises(GoldenError, match=message.replace("[", r"\[").replace("]", r"\]")):
        unpack_input(GoldenTensor.model_validate(tensor))


def test_an_output_with_the_wrong_count_of_values_is_refused() -> None:
    t = GoldenTensor(dtype="int8", shape=[1, 10], stride=3, data="AAA=")
    with pytest.raises(GoldenError, match="holds 2 values, expected 4"):
        unpack_output(t)


def test_the_manifest_schema_bounds_a_golden_block() -> None:
    sample = {"inputs": [{"dtype": "int8", "shape": [1], "data": ""}], "outputs": []}
    with pytest.raises(ValueError, match="outputs"):
        Golden.model_validate({"runtime": "x", "samples": [sample]})
    with pytest.raises(ValueError, match="shape"):
        GoldenTensor.model_validate({"dtype": "int8", "shape": [1, -4], "data": ""})
    with pytest.raises(ValueError, match="dtype"):
        GoldenTensor.model_validate({"dtype": "object", "shape": [1], "data": ""})
