"""The converter in-process: accuracy gate, bad inputs, quantisation modes, data loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.models.manifest import (
    Preprocess,
    generate_keypair,
    load_public_key,
    read_bundle,
    verify_bundle,
)
from converter.cli import main
from converter.datasets import load_dataset
from converter.errors import ConverterError
from converter.examples import ExampleFiles
from tests.converter_support import build_digits_bundle, digits_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits() -> ExampleFiles:
    return digits_example()


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def convert_args(digits: ExampleFiles, out: Path, *extra: object) -> list[object]:
    return [
        "convert",
        digits.model,
        "-o",
        out,
        "--calib",
        digits.calib,
        "--samples",
        "50",
        "--std",
        "255",
        *extra,
    ]


@pytest.fixture(scope="module")
def blank_calib(digits: ExampleFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wrong calibration set: the digits' shape, but every image a flat grey (a
    camera pointed at a wall). The activation ranges it gives cut real digits off."""
    x = np.load(digits.calib)["x"]
    path = tmp_path_factory.mktemp("calib") / "blank.npz"
    np.savez(path, x=np.full_like(x, 128.0))
    return path


def wrong_calib_args(digits: ExampleFiles, out: Path, calib: Path, *extra: object) -> list[object]:
    args = convert_args(digits, out, "--val", digits.val, *extra)
    args[args.index("--calib") + 1] = calib
    return args


def test_accuracy_gate_fails_with_exit_3_and_publishes_nothing(
    digits: ExampleFiles,
    blank_calib: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bundle"
    # The default gate (--max-drop 0.01) against a model that really lost accuracy.
    code, stdout, err = run_cli(capsys, *wrong_calib_args(digits, out, blank_calib, "--json"))
    assert code == 3, err
    assert stdout == ""
    assert len(err) == 1 and "exceeds --max-drop 1.00" in err[0], err
    assert "no bundle published" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_the_wrong_calibration_really_costs_accuracy(
    digits: ExampleFiles,
    blank_calib: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Allowed a large drop, the same conversion publishes and records what it lost:
    # the gate above refused a measured drop, not a conversion failure.
    out = tmp_path / "bundle"
    code, stdout, err = run_cli(
        capsys, *wrong_calib_args(digits, out, blank_calib, "--max-drop", "0.9", "--json")
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["accuracy_drop"] > 0.05, summary
    metrics = read_bundle(out).manifest.metrics
    assert metrics is not None and metrics.accuracy_drop is not None
    assert metrics.accuracy_drop > 0.05


def test_gate_failure_leaves_an_existing_bundle_untouched(
    digits: ExampleFiles,
    blank_calib: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = build_digits_bundle(tmp_path / "bundle", version="1")
    before = (out / "manifest.json").read_bytes()
    code, _, _ = run_cli(capsys, *wrong_calib_args(digits, out, blank_calib, "--version", "2"))
    assert code == 3
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_build_digits_bundle_gives_signed_versions(tmp_path: Path) -> None:
    private, public = generate_keypair()
    (tmp_path / "k.key").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    b1 = build_digits_bundle(tmp_path / "v1", "1", sign_key=tmp_path / "k.key")
    b2 = build_digits_bundle(tmp_path / "v2", "2", sign_key=tmp_path / "k.key")
    keys = [load_public_key(tmp_path / "k.pub")]
    assert verify_bundle(b1, keys).manifest.version == "1"
    assert verify_bundle(b2, keys).manifest.version == "2"
    metrics = read_bundle(b2).manifest.metrics
    assert metrics is not None and metrics.accuracy_drop is not None
    assert metrics.accuracy_drop <= 0.01


@pytest.mark.parametrize(
    ("quant", "input_dtype", "ratio_below"),
    [("int8-float-io", "float32", 0.35), ("float16", "float32", 0.6), ("dynamic", "float32", 0.35)],
)
def test_other_quantisation_modes(
    quant: str,
    input_dtype: str,
    ratio_below: float,
    digits: ExampleFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(
        capsys,
        *convert_args(digits, tmp_path / "b", "--quant", quant, "--val", digits.val, "--json"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["quantization"] == quant == read_bundle(tmp_path / "b").manifest.quantization
    assert result["input_dtype"] == input_dtype
    assert result["size_ratio"] < ratio_below
    assert result["accuracy_drop"] <= 0.01


def _saved_model(path: Path, odd_ops: bool) -> Path:
    import tensorflow as tf

    class Dense(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.random.stateless_normal((8, 4), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            y = tf.matmul(x, self.w)
            y = tf.math.sin(y) + tf.math.cumsum(y, axis=-1) if odd_ops else tf.nn.relu(y)
            return {"out": y}

    module = Dense()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path


def test_saved_model_converts_to_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _saved_model(tmp_path / "sm", odd_ops=False)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((16, 8), np.float32))
    np.savez(tmp_path / "val.npz", x=np.random.default_rng(1).random((16, 8), np.float32))
    code, out, err = run_cli(
        capsys,
        "convert",
        model,
        "-o",
        tmp_path / "b",
        "--calib",
        tmp_path / "calib.npy",
        "--val",
        tmp_path / "val.npz",
        "--task",
        "raw",
        "--name",
        "dense",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert (result["input_dtype"], result["output_dtype"]) == ("int8", "int8")
    assert result["accuracy_drop"] is None and result["top1_agreement"] is None
    assert result["sqnr_db"][0] > 20
    assert read_bundle(tmp_path / "b").manifest.outputs[0].shape == [1, 4]


def test_unquantisable_ops_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _saved_model(tmp_path / "odd", odd_ops=True)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((8, 8), np.float32))
    code, _, err = run_cli(
        capsys,
        "convert",
        model,
        "-o",
        tmp_path / "b",
        "--calib",
        tmp_path / "calib.npy",
        "--task",
        "raw",
    )
    assert code == 2
    assert err == [
        "edge-convert convert: error: model has ops that cannot be quantised to int8: CUMSUM, SIN"
    ]
    assert not (tmp_path / "b").exists()


def _bad_image_folder(root: Path) -> Path:
    folder = root / "images"
    (folder / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "cat" / "ok.png")
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


BAD_INPUTS = {
    "missing model": (lambda d, t: ["convert", t / "nope.keras", "--calib", d.calib],
                      "nope.keras: not found"),
    "not a model": (lambda d, t: ["convert", _write(t / "m.keras", b"junk"), "--calib", d.calib],
                    "m.keras: not a Keras model"),
    "unknown model kind": (lambda d, t: ["convert", d.calib, "--calib", d.calib],
                           "not a model (expected a .keras or .h5 file or a SavedModel"),
    "missing calibration": (lambda d, t: ["convert", d.model, "--calib", t / "none.npz"],
                            "none.npz: not found"),
    "calibration shape": (lambda d, t: ["convert", d.model, "--calib",
                                        _npy(t / "c.npy", (3, 7))],
                          "c.npy: samples have shape [7] but the model input is [1, 8, 8, 1]"),
    "empty folder": (lambda d, t: ["convert", d.model, "--calib", _mkdir(t / "empty")],
                     "empty: no images"),
    "undecodable image": (lambda d, t: ["convert", d.model, "--calib", _bad_image_folder(t),
                                        "--color", "gray"],
                          "broken.png: cannot decode image"),
    "labels length": (lambda d, t: ["convert", d.model, "--calib", d.calib, "--labels",
                                    _write(t / "l.txt", b"a\nb\nc\n")],
                      "labels file has 3 labels but the model outputs 10 classes"),
    "npz without x": (lambda d, t: ["convert", d.model, "--calib", _npz(t / "d.npz")],
                      "d.npz: .npz has no 'x' array"),
    "bad name": (lambda d, t: ["convert", d.model, "--calib", d.calib, "--name", "a/b"],
                 "name 'a/b'"),
    "missing sign key": (lambda d, t: ["convert", d.model, "--calib", d.calib,
                                       "--sign-key", t / "k.key"],
                         "k.key: private key not found"),
}  # fmt: skip


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy(path: Path, shape: tuple[int, ...]) -> Path:
    np.save(path, np.zeros(shape, np.float32))
    return path


def _npz(path: Path) -> Path:
    np.savez(path, images=np.zeros((2, 8, 8, 1)))
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, digits: ExampleFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_args, cause = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bundle"
    code, stdout, err = run_cli(capsys, *make_args(digits, work), "-o", out)
    assert code == 2
    assert stdout == ""
    assert len(err) == 1, err
    assert err[0].startswith("edge-convert convert: error: ")
    assert cause in err[0]
    assert not out.exists()


def test_convert_refuses_to_replace_a_directory_that_is_not_a_bundle(
    digits: ExampleFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *convert_args(digits, tmp_path))
    assert code == 2 and "exists and is not a bundle" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_image_folder_with_class_subfolders_gives_labels(tmp_path: Path) -> None:
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 12), (value, 0, 255 - value)).save(tmp_path / label / f"{i}.png")
    pre = Preprocess(mean=[127.5], std=[127.5], color="bgr")
    data = load_dataset(tmp_path, (1, 4, 4, 3), pre)
    assert data.x.shape == (4, 4, 4, 3) and data.x.dtype == np.float32
    assert data.y is not None and list(data.y) == [0, 0, 1, 1]
    # bgr: blue first; the cat images are pure blue.
    np.testing.assert_allclose(data.x[0, 0, 0], [1.0, -1.0, -1.0])
    np.testing.assert_allclose(data.x[3, 0, 0], [-1.0, -1.0, 1.0])
    assert len(data.sha256()) == 64


def test_csv_rows_with_a_label_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    data = load_dataset(csv_path, (1, 3), Preprocess(mean=[1.0], std=[2.0], layout="NC"))
    np.testing.assert_allclose(data.x, [[0, 0.5, 1], [1.5, 2, 2.5]])
    assert data.y is not None and list(data.y) == [0, 1]


def test_shipped_sensor_csv_loads_as_rows() -> None:
    path = Path(__file__).resolve().parent.parent / "configs/samples/vibration.csv"
    data = load_dataset(path, (1, 4), Preprocess(layout="NC"))
    assert data.x.shape[1] == 4 and data.y is None and len(data) > 10


def test_subset_is_deterministic_and_changes_the_calibration_hash(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(40, dtype=np.float32).reshape(10, 4))
    data = load_dataset(tmp_path / "x.npy", (1, 4), Preprocess())
    a, b = data.subset(5), data.subset(5)
    assert len(a) == 5 and a.sha256() == b.sha256() != data.sha256()


def test_mean_and_std_must_fit_the_channels(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ConverterError, match="need 1 or 3 values"):
        load_dataset(tmp_path / "x.npy", (1, 4, 4, 3), Preprocess(mean=[0.0, 1.0]))


def test_progress_bar_draws_to_its_stream_and_is_silent_off_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from converter.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar("calibrate", 4, stream)
    for _ in range(4):
        bar.advance()
    assert stream.getvalue().endswith("calibrate    [" + "#" * 30 + "] 4/4")
    with ProgressBar.for_terminal("validate", 3) as silent:  # pytest's stderr is no terminal
        silent.advance(3)
    assert capsys.readouterr() == ("", "")
