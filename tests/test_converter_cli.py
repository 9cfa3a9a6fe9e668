"""edge-convert end to end, as a user runs it: subprocesses, real models, real runtimes."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.models.manifest import read_bundle
from agent.models.runtime import load_model
from converter.examples import ExampleFiles

pytestmark = pytest.mark.slow


def edge_convert(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converter", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> ExampleFiles:
    out = tmp_path_factory.mktemp("digits") / "digits.keras"
    proc = edge_convert("example", "digits", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return ExampleFiles(
        model=out,
        calib=out.with_name("digits-calib.npz"),
        val=out.with_name("digits-val.npz"),
        labels=out.with_name("digits-labels.txt"),
    )


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keydir = tmp_path_factory.mktemp("keys") / "keys"
    proc = edge_convert("keygen", "-o", keydir)
    assert proc.returncode == 0, proc.stderr
    return keydir


@pytest.fixture(scope="session")
def converted(
    digits: ExampleFiles, keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    bundle = tmp_path_factory.mktemp("converted") / "digits-bundle"
    proc = edge_convert(
        "convert",
        digits.model,
        "-o",
        bundle,
        "--calib",
        digits.calib,
        "--val",
        digits.val,
        "--labels",
        digits.labels,
        "--std",
        "255",
        "--sign-key",
        keys / "signing.key",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return bundle, json.loads(proc.stdout)


def test_digits_convert_meets_size_and_accuracy(converted: tuple[Path, dict[str, Any]]) -> None:
    bundle, result = converted
    assert result["size_ratio"] <= 0.30
    assert result["model_bytes"] == (bundle / "model.tflite").stat().st_size
    assert result["model_bytes"] / result["float_model_bytes"] == pytest.approx(
        result["size_ratio"], abs=1e-3
    )
    assert result["float_accuracy"] >= 0.95
    assert result["accuracy_drop"] <= 0.01
    assert result["accuracy_drop"] == pytest.approx(
        result["float_accuracy"] - result["int8_accuracy"], abs=1e-6
    )
    assert 0.97 <= result["top1_agreement"] <= 1.0
    assert (result["input_dtype"], result["output_dtype"]) == ("int8", "int8")
    assert result["bundle"] == str(bundle)
    assert len(result["sha256"]) == 64
    assert result["signed"] and result["gate_applied"]


def test_digits_manifest_describes_the_model(converted: tuple[Path, dict[str, Any]]) -> None:
    bundle, result = converted
    b = read_bundle(bundle)
    m = b.manifest
    assert b.signature is not None
    assert (m.name, m.version, m.task, m.quantization) == ("digits", "1", "classify", "int8")
    assert m.model.sha256 == result["sha256"]
    assert m.labels == [str(d) for d in range(10)]
    assert (m.inputs[0].shape, m.inputs[0].dtype) == ([1, 8, 8, 1], "int8")
    assert (m.outputs[0].shape, m.outputs[0].dtype) == ([1, 10], "int8")
    assert m.inputs[0].scale > 0 and m.outputs[0].scale > 0
    assert m.preprocess.std == [255.0]
    assert m.metrics is not None and m.metrics.samples == 360
    assert m.metrics.sqnr_db and m.metrics.sqnr_db[0] > 10
    assert m.calibration is not None and m.calibration.samples == 300
    assert len(m.calibration.sha256) == 64
    assert m.producer.tensorflow and m.producer.converter.startswith("edge-convert ")


@pytest.mark.parametrize("runtime", ["ai_edge_litert", "tflite_runtime"])
def test_digits_int8_runs_on_both_device_runtimes(
    runtime: str, converted: tuple[Path, dict[str, Any]], digits: ExampleFiles
) -> None:
    bundle, result = converted
    loaded = load_model(bundle / "model.tflite", runtime=runtime)
    assert loaded.runtime.name == runtime
    (inp,), (out,) = loaded.inputs, loaded.outputs
    with np.load(digits.val) as data:
        x, y = data["x"] / 255.0, data["y"]
    predictions = []
    for i in range(len(x)):
        loaded.interpreter.set_tensor(inp.index, inp.quantize(x[i : i + 1]))
        loaded.interpreter.invoke()
        predictions.append(out.dequantize(loaded.interpreter.get_tensor(out.index)).argmax())
    accuracy = float(np.mean(np.array(predictions) == y))
    assert accuracy == pytest.approx(result["int8_accuracy"], abs=0.01)


def test_digits_bundle_carries_reference_statistics_and_golden_samples(
    converted: tuple[Path, dict[str, Any]], keys: Path, tmp_path: Path
) -> None:
    bundle, result = converted
    assert (result["reference_samples"], result["golden_samples"]) == (360, 4)
    m = read_bundle(bundle).manifest
    assert m.reference is not None and m.reference.samples == 360
    classify = m.reference.classify
    assert classify is not None and classify.classes == 10
    assert sum(classify.top1_freq) == pytest.approx(1.0, abs=1e-4)
    assert m.golden is not None and m.golden.runtime.startswith("ai_edge_litert ")
    assert (m.golden.tolerance_steps, len(m.golden.samples)) == (4.0, 4)
    # Both are signed with the manifest: a changed tolerance does not verify.
    copy = shutil.copytree(bundle, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["golden"]["tolerance_steps"] = 100
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = edge_convert("verify", copy, "--pub", keys / "signing.pub")
    assert proc.returncode == 1 and "does not verify" in proc.stderr


def test_bundle_of_a_foreign_tflite_records_them_from_val(
    converted: tuple[Path, dict[str, Any]], digits: ExampleFiles, tmp_path: Path
) -> None:
    model = converted[0] / "model.tflite"
    out = tmp_path / "b"
    args = ("bundle", model, "-o", out, "--val", digits.val, "--std", "255", "--samples", "50")
    proc = edge_convert(*args, "--golden", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["reference_samples"], result["golden_samples"]) == (50, 2)
    golden = read_bundle(out).manifest.golden
    assert golden is not None
    proc = edge_convert("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "  reference: classify outputs of 50 samples, top-1 confidence median" in proc.stdout
    assert "  golden: 2 samples from ai_edge_litert " in proc.stdout
    assert golden.samples[0].inputs[0].data not in proc.stdout  # no base64 on the screen
    proc = edge_convert("inspect", out, "--json")
    info = json.loads(proc.stdout)["bundle"]
    assert info["golden"]["samples"] == 2 and "data" not in json.dumps(info["golden"])
    assert (info["reference"]["kind"], info["reference"]["samples"]) == ("classify", 50)

    proc = edge_convert(*args, "--golden", "17")
    assert proc.returncode == 2
    assert error_lines(proc) == ["edge-convert bundle: error: --golden must be 0..16, got 17"]
    proc = edge_convert("bundle", model, "-o", tmp_path / "none", "--json")
    assert json.loads(proc.stdout)["golden_samples"] == 0  # no --val: nothing to take them from


def test_verify_accepts_the_signed_bundle(
    converted: tuple[Path, dict[str, Any]], keys: Path
) -> None:
    proc = edge_convert("verify", converted[0], "--pub", keys / "signing.pub")
    assert proc.returncode == 0, proc.stderr
    assert "ok (digits 1" in proc.stdout


def test_verify_rejects_a_tampered_model(
    converted: tuple[Path, dict[str, Any]], keys: Path, tmp_path: Path
) -> None:
    bundle = shutil.copytree(converted[0], tmp_path / "b")
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.tflite").write_bytes(bytes(data))
    proc = edge_convert("verify", bundle, "--pub", keys / "signing.pub")
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "sha256" in proc.stderr


def test_verify_rejects_a_tampered_manifest(
    converted: tuple[Path, dict[str, Any]], keys: Path, tmp_path: Path
) -> None:
    bundle = shutil.copytree(converted[0], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["labels"][0] = "zero"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = edge_convert("verify", bundle, "--pub", keys / "signing.pub")
    assert proc.returncode == 1
    assert "does not verify" in proc.stderr


def test_verify_rejects_another_key_and_an_unsigned_bundle(
    converted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    assert edge_convert("keygen", "-o", tmp_path / "other").returncode == 0
    proc = edge_convert("verify", converted[0], "--pub", tmp_path / "other/signing.pub")
    assert proc.returncode == 1 and "does not verify" in proc.stderr
    bundle = shutil.copytree(converted[0], tmp_path / "b")
    (bundle / "manifest.sig").unlink()
    proc = edge_convert("verify", bundle, "--pub", tmp_path / "other/signing.pub")
    assert proc.returncode == 1 and "not signed" in proc.stderr


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: Path) -> None:
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert (keys / "signing.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (keys / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_keygen_refuses_to_overwrite(keys: Path) -> None:
    before = (keys / "signing.key").read_bytes()
    proc = edge_convert("keygen", "-o", keys)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"edge-convert keygen: error: {keys / 'signing.key'}: already exists; "
        "refusing to overwrite a key"
    ]
    assert (keys / "signing.key").read_bytes() == before


def test_bundle_sign_verify_and_inspect_an_existing_tflite(
    tiny_int8_model: Path, keys: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "zoo"
    proc = edge_convert("bundle", tiny_int8_model, "-o", bundle, "--name", "zoo", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["name"], result["quantization"], result["signed"]) == ("zoo", "int8", False)
    m = read_bundle(bundle).manifest
    assert (m.inputs[0].shape, m.inputs[0].dtype) == ([1, 8, 8, 1], "int8")
    assert m.outputs[0].shape == [1, 10] and m.outputs[0].scale > 0
    assert m.metrics is None and m.calibration is None and m.producer.tensorflow is None

    assert edge_convert("verify", bundle, "--pub", keys / "signing.pub").returncode == 1
    proc = edge_convert("sign", bundle, "--key", keys / "signing.key")
    assert proc.returncode == 0, proc.stderr
    proc = edge_convert("verify", bundle, "--pub", keys / "signing.pub")
    assert proc.returncode == 0, proc.stderr

    proc = edge_convert("inspect", bundle, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "bundle" and info["bundle"]["signed"]
    assert info["quantization"] == "int8"
    assert info["op_histogram"]["CONV_2D"] == 1
    assert info["op_histogram"]["FULLY_CONNECTED"] == 1
    assert info["size_bytes"] == tiny_int8_model.stat().st_size
    assert info["float_ops"] == []
    proc = edge_convert("inspect", bundle)
    assert proc.returncode == 0, proc.stderr
    assert "bundle: zoo 1 (classify, int8, signed)" in proc.stdout


def test_bundle_of_a_float_model_says_so(tiny_float_model: Path, tmp_path: Path) -> None:
    proc = edge_convert("bundle", tiny_float_model, "-o", tmp_path / "f", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quantization"] == "none"


def test_bundle_with_a_wrong_labels_file_writes_nothing(
    tiny_int8_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    out = tmp_path / "b"
    proc = edge_convert("bundle", tiny_int8_model, "-o", out, "--labels", tmp_path / "labels.txt")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "edge-convert bundle: error: labels file has 2 labels but the model outputs 10 classes"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


def test_inspect_a_tflite_file(tiny_int8_model: Path) -> None:
    proc = edge_convert("inspect", tiny_int8_model)
    assert proc.returncode == 0, proc.stderr
    assert "quantization: int8" in proc.stdout
    assert "input: " in proc.stdout and "int8[1, 8, 8, 1]" in proc.stdout
    assert "CONV_2D x1" in proc.stdout


@pytest.mark.parametrize(
    ("content", "cause"),
    [(None, "not found"), (b"garbage" * 20, "not a TFLite model")],
)
def test_inspect_and_bundle_reject_what_is_not_a_tflite(
    content: bytes | None, cause: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.tflite"
    if content is not None:
        path.write_bytes(content)
    for args in (("inspect", path), ("bundle", path, "-o", tmp_path / "out")):
        proc = edge_convert(*args)
        assert proc.returncode == 2
        (line,) = error_lines(proc)
        assert cause in line and str(path) in line
        assert not (tmp_path / "out").exists()


def test_convert_rejects_bad_calibration_data_with_one_line(
    digits: ExampleFiles, tmp_path: Path
) -> None:
    np.save(tmp_path / "calib.npy", np.zeros((4, 9, 9), np.float32))
    out = tmp_path / "bundle"
    proc = edge_convert("convert", digits.model, "-o", out, "--calib", tmp_path / "calib.npy")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"edge-convert convert: error: {tmp_path / 'calib.npy'}: samples have shape [9, 9] "
        "but the model input is [1, 8, 8, 1]"
    ]
    assert not out.exists()
