"""PyTorch sources through the real toolchain: `edge-convert` from the torch venv
(.venv-torch, `make setup-torch`: torch 2.13 CPU and litert-torch), the bundles it writes
checked, verified and served by a real agent of the workstation venv (which has no torch).

Without .venv-torch these tests skip, and say so; with ``EDGE_REQUIRE_TORCH=1`` (set by
`make test`) they fail instead. The error paths that need no torch run in this venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.loops.sources.synthetic import digit_samples
from agent.models.manifest import generate_keypair, read_bundle
from agent.protocol import Result, State
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent
TORCH_PY = ROOT / ".venv-torch" / "bin" / "python"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DIGITS_DATA = ("--std", "255", "--color", "gray")

pytestmark = pytest.mark.slow


def torch_python() -> Path:
    if TORCH_PY.exists():
        return TORCH_PY
    reason = f"no PyTorch converter venv at {TORCH_PY}: run make setup-torch"
    if os.environ.get("EDGE_REQUIRE_TORCH") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def edge_convert(
    *args: str | Path, python: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python or torch_python()), "-m", "converter", *map(str, args)],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=cwd or ROOT,
    )  # fmt: skip


def in_torch(code: str, *args: str | Path) -> str:
    """Run ``code`` in the torch venv; its stdout."""
    proc = subprocess.run(
        [str(torch_python()), "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def ok_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json printed more than one line: {proc.stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("edge-convert")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@dataclass
class Example:
    dir: Path
    model: Path
    calib: Path
    val: Path
    labels: Path
    key: Path
    pub: Path


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Example:
    wd = tmp_path_factory.mktemp("torch")
    proc = edge_convert("example", "digits-torch", "-o", wd / "digits.pt2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    private, public = generate_keypair()
    (wd / "fleet.key").write_bytes(private)
    (wd / "fleet.pub").write_bytes(public)
    return Example(
        wd, wd / "digits.pt2", wd / "digits-calib.npz", wd / "digits-val.npz",
        wd / "digits-labels.txt", wd / "fleet.key", wd / "fleet.pub",
    )  # fmt: skip


def convert_args(ex: Example, model: str | Path, out: Path, *more: str) -> list[str | Path]:
    return [
        "convert", model, "--calib", ex.calib, "--val", ex.val, "--labels", ex.labels,
        *DIGITS_DATA, "-o", out, "--json", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bundle(example: Example) -> tuple[Path, dict[str, Any]]:
    out = example.dir / "bundle"
    summary = ok_json(
        edge_convert(*convert_args(example, example.model, out, "--sign-key", str(example.key)))
    )
    return out, summary


def test_exported_program_becomes_a_signed_int8_nhwc_bundle_within_the_gate(
    example: Example, bundle: tuple[Path, dict[str, Any]]
) -> None:
    out, summary = bundle
    assert summary["quantization"] == "int8" and summary["signed"] is True
    assert (summary["input_dtype"], summary["output_dtype"]) == ("int8", "int8")
    assert summary["gate_applied"] is True and summary["validation_samples"] == 360
    assert summary["float_accuracy"] >= 0.95, summary
    assert summary["accuracy_drop"] <= 0.01 and summary["top1_agreement"] >= 0.98, summary
    assert summary["golden_samples"] == 4 and summary["reference_samples"] == 360
    manifest = read_bundle(out).manifest
    # The NCHW module was converted to take NHWC: the device pre-processes as for Keras.
    assert manifest.inputs[0].shape == [1, 8, 8, 1] and manifest.preprocess.layout == "NHWC"
    assert manifest.outputs[0].shape == [1, 10] and manifest.labels == [str(d) for d in range(10)]
    assert manifest.calibration is not None and manifest.calibration.samples == 300
    # Verified by the workstation venv's own converter, which has no torch.
    proc = edge_convert("verify", out, "--pub", example.pub, python=Path(sys.executable))
    assert proc.returncode == 0 and "ok (digits 1" in proc.stdout, proc.stdout + proc.stderr


def test_a_real_agent_serves_it_and_agrees_with_the_float_pytorch_model(
    example: Example, bundle: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    images, labels = digit_samples()
    np.save(tmp_path / "images.npy", images)
    # The float PyTorch model's answer per image, NCHW in 0..1 as it was trained.
    float_top1 = json.loads(
        in_torch(
            "import sys, json, numpy as np, torch\n"
            "module = torch.export.load(sys.argv[1]).module()\n"
            "x = np.load(sys.argv[2]).astype(np.float32)[:, None] / 255\n"
            "with torch.no_grad():\n"
            "    top = [int(module(torch.from_numpy(x[i:i+1])).argmax()) for i in range(len(x))]\n"
            "print(json.dumps(top))\n",
            example.model,
            tmp_path / "images.npy",
        )
    )
    assert np.mean(np.array(float_top1) == labels) >= 0.95
    with serving_agent(tmp_path, bundle[0], example.pub) as results:
        served = {}
        deadline = time.monotonic() + 60
        while len(served) < len(images) and time.monotonic() < deadline:
            for r in results():
                if r.classes:
                    served[(r.frame - 1) % len(images)] = r.classes[0].index
            time.sleep(0.2)
    assert len(served) >= 100, f"only {len(served)} distinct frames served"
    agree = np.mean([served[i] == float_top1[i] for i in served])
    assert agree >= 0.98, f"device and float PyTorch model agree on {agree:.3f} of frames"


@contextlib.contextmanager
def serving_agent(wd: Path, bundle: Path, pub: Path) -> Iterator[Callable[[], list[Result]]]:
    """A real agent (this venv, no torch) with ``bundle`` deployed by `edge-fleet deploy`;
    yields a function giving the results so far."""
    broker = Broker(wd / "mosquitto")
    broker.start()
    config = {
        "device": {"id": "pi-torch"},
        "state_dir": str(wd / "state"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "models": {"trusted_keys": [str(pub)],
                   "probation": {"duration_s": 1.0, "min_inferences": 3}},
        "pipelines": [{
            "name": "digits", "model": "digits", "queue": "fifo",
            # 8x8: the model's size, so the device sees exactly the images of digit_samples.
            "source": {"type": "synthetic", "kind": "digits", "width": 8, "height": 8,
                       "channels": 1, "fps": 50},
        }],
    }  # fmt: skip
    (wd / "agent.yaml").write_text(yaml.safe_dump(config))
    collector = MessageCollector(broker, ["edge/pi-torch/#"])
    log_path = wd / "agent.log"

    def received(model: Any, kind: str) -> list[Any]:
        return [
            model.model_validate_json(m.payload)
            for m in list(collector.messages)
            if m.topic.split("/")[2] == kind
        ]

    with log_path.open("w") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(wd / "agent.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=wd,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not any(s.online for s in received(State, "state")):
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            proc = subprocess.run(
                [sys.executable, "-m", "fleet", "deploy", str(bundle), "--host", "127.0.0.1",
                 "--port", str(broker.port), "--device", "pi-torch", "--pub", str(pub),
                 "--via", "http", "--json"],
                capture_output=True, text=True, timeout=180, env=ENV, cwd=wd,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr + log_path.read_text()[-3000:]
            yield lambda: received(Result, "results")
        finally:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
            collector.close()
            broker.stop()


def test_factory_and_torchscript_sources_dynamic_and_float16(example: Example) -> None:
    # module:factory, named as `python -m` would import it, at an NCHW --input-shape.
    factory = ok_json(
        edge_convert(
            *convert_args(example, "converter.torch_examples:digits_net", example.dir / "f",
                          "--input-shape", "1,1,8,8", "--quant", "dynamic")
        )
    )  # fmt: skip
    assert factory["name"] == "digits_net" and factory["quantization"] == "dynamic"
    assert factory["input_dtype"] == "float32" and factory["accuracy_drop"] <= 0.01
    # TorchScript, traced from the trained module.
    in_torch(
        "import sys, torch\n"
        "from converter.torch_examples import train_digits\n"
        "torch.jit.trace(train_digits(epochs=4), torch.zeros(1, 1, 8, 8)).save(sys.argv[1])\n",
        example.dir / "digits.ts",
    )
    missing = edge_convert(*convert_args(example, example.dir / "digits.ts", example.dir / "t0"))
    assert "TorchScript holds no example input: give --input-shape" in one_error_line(missing)
    scripted = ok_json(
        edge_convert(*convert_args(example, example.dir / "digits.ts", example.dir / "t",
                                   "--input-shape", "1,1,8,8", "--quant", "float16"))
    )  # fmt: skip
    assert scripted["quantization"] == "float16" and scripted["input_dtype"] == "float32"
    assert scripted["gate_applied"] is True and scripted["accuracy_drop"] <= 0.01
    assert 0.4 < scripted["size_ratio"] < 0.6, scripted  # float16 weights: half the bytes
    assert read_bundle(example.dir / "t").manifest.inputs[0].shape == [1, 8, 8, 1]


def test_the_gate_refuses_a_badly_calibrated_model_with_exit_3(example: Example) -> None:
    # Calibrated on blank images only: the int8 ranges clip every real digit.
    np.savez(example.dir / "blank.npz", x=np.zeros((50, 8, 8, 1), np.uint8))
    out = example.dir / "gated"
    proc = edge_convert(
        "convert", example.model, "--calib", example.dir / "blank.npz", "--val", example.val,
        "--labels", example.labels, *DIGITS_DATA, "-o", out,
    )  # fmt: skip
    assert "exceeds --max-drop 1.00" in one_error_line(proc, 3)
    assert not out.exists()


def test_nchw_arrays_are_taken_for_what_they_are(example: Example) -> None:
    """A PyTorch user's data in NCHW is transposed, not reshaped into noise."""
    val = np.load(example.val)
    np.savez(example.dir / "val-nchw.npz", x=np.transpose(val["x"], (0, 3, 1, 2)), y=val["y"])
    summary = ok_json(
        edge_convert(
            "convert", example.model, "--calib", example.calib, "--val",
            example.dir / "val-nchw.npz", *DIGITS_DATA, "-o", example.dir / "nchw", "--json",
        )
    )  # fmt: skip
    assert summary["float_accuracy"] >= 0.95 and summary["accuracy_drop"] <= 0.01


def test_weights_without_a_model_and_bad_factories_are_refused_in_one_line(
    example: Example,
) -> None:
    in_torch(
        "import sys, torch\n"
        "from converter.torch_examples import DigitsNet\n"
        "torch.save(DigitsNet().state_dict(), sys.argv[1])\n",
        example.dir / "weights.pt",
    )
    line = one_error_line(edge_convert(*convert_args(example, example.dir / "weights.pt", "x")))
    assert "holds weights without a model" in line and "module:factory" in line
    (example.dir / "factories.py").write_text("def not_a_model():\n    return 42\n")
    line = one_error_line(
        edge_convert(*convert_args(example, "factories:not_a_model", "x", "--input-shape",
                                   "1,1,8,8"), cwd=example.dir)
    )  # fmt: skip
    assert "not_a_model() returned int, not an nn.Module" in line
    line = one_error_line(
        edge_convert(*convert_args(example, "no_such_module:make", "x", "--input-shape", "1,1,8,8"))
    )
    assert "cannot import no_such_module" in line
    line = one_error_line(
        edge_convert(*convert_args(example, "converter.torch_examples:digits_net", "x",
                                   "--input-shape", "1,3,8,8"))
    )  # fmt: skip
    assert "does not run on an input of shape [1, 3, 8, 8]" in line


# Without torch: this venv, as a Keras-only workstation has it ---------------------------


def run_here(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return edge_convert(*args, python=Path(sys.executable), cwd=cwd)


def test_without_torch_a_pytorch_model_gets_one_line_naming_the_extra(tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
    line = one_error_line(run_here("convert", model, "--calib", model, "-o", "b", cwd=tmp_path))
    assert "PyTorch models need torch, not installed" in line and "make setup-torch" in line
    assert not (tmp_path / "b").exists()


def test_int8_with_float_io_is_refused_before_any_work(tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
    proc = run_here(
        "convert", model, "--calib", model, "--quant", "int8-float-io", "-o", "b", cwd=tmp_path
    )
    line = one_error_line(proc)
    assert "--quant int8-float-io is not supported for PyTorch models" in line
    assert "int8 input and output" in line and "use int8, dynamic or float16" in line


def test_a_file_that_is_not_a_pytorch_archive_is_refused_before_torch_loads(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.pt2").write_bytes(b"not a zip")
    line = one_error_line(run_here("convert", "m.pt2", "--calib", "m.pt2", "-o", "b", cwd=tmp_path))
    assert "not a PyTorch model (a .pt2 file is a zip archive)" in line


def test_no_agent_module_imports_torch_even_where_torch_is_installed() -> None:
    """The torch venv has torch: importing every agent module there must not load it."""
    out = in_torch(
        "import importlib, pkgutil, sys, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in\n"
        "             ('torch', 'litert_torch', 'tensorflow', 'converter', 'fleet'))\n"
        "print(len([n for n in sys.modules if n.startswith('agent.')]), bad)\n"
    )
    count, bad = out.split(" ", 1)
    assert int(count) > 50 and bad.strip() == "[]", out
