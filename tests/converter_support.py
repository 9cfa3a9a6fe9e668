"""Real converter-built digits bundles for any test: train once per process, convert per version.

    bundle = build_digits_bundle(tmp_path / "digits-v2", version="2", sign_key=key)

TensorFlow is imported lazily, after the TFLite runtimes (conftest imports those first).
With ``EDGE_TEST_MODELS`` set, the bundle is a copy of the one tests/prebuilt_models.py
converted for the same arguments, signed here with ``sign_key``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from agent.models.manifest import Preprocess
from converter.bundle import Task, load_signing_key, sign_bundle
from converter.examples import DIGITS_STD, ExampleFiles, build_digits
from converter.pipeline import ConvertOptions, run_convert
from tests.model_factory import prebuilt

_trained: ExampleFiles | None = None


def digits_example() -> ExampleFiles:
    """The digits Keras model and its data, trained on first use (about 10 s)."""
    global _trained
    if _trained is None:
        workdir = Path(tempfile.mkdtemp(prefix="edge-digits-"))
        atexit.register(shutil.rmtree, workdir, True)
        _trained = build_digits(workdir / "digits.keras")
    return _trained


def digits_name(name: str, version: str, samples: int, task: Task) -> str:
    return f"bundle-{name}-v{version}-{samples}-{task}"


def build_digits_bundle(
    dest_dir: Path,
    version: str = "1",
    sign_key: Path | None = None,
    *,
    name: str = "digits",
    samples: int = 100,
    task: Task = "classify",
) -> Path:
    """A full-integer int8 digits bundle at ``dest_dir``, validated and (with a key) signed."""
    if prebuilt(digits_name(name, version, samples, task), dest_dir):
        key = load_signing_key(sign_key)
        if key is not None:
            sign_bundle(dest_dir, key)
        return dest_dir
    example = digits_example()
    run_convert(
        ConvertOptions(
            model=example.model,
            out=dest_dir,
            calib=example.calib,
            val=example.val,
            samples=samples,
            labels=example.labels,
            name=name,
            version=version,
            preprocess=Preprocess(std=[DIGITS_STD]),
            sign_key=sign_key,
            task=task,
            progress=False,
        )
    )
    return dest_dir
