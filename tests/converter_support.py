"""Real converter-built digits, colors and shapes (detector) bundles for any test: train
once per process (per seed), convert per version.

    bundle = build_digits_bundle(tmp_path / "digits-v2", version="2", sign_key=key)
    retrained = build_colors_bundle(tmp_path / "colors-v2", version="2", seed=1)

TensorFlow is imported lazily, after the TFLite runtimes (conftest imports those first).
With ``EDGE_TEST_MODELS`` set, the bundle is a copy of the one tests/prebuilt_models.py
converted for the same arguments, signed here with ``sign_key``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.models.manifest import Preprocess
from converter.bundle import Task, load_signing_key, sign_bundle
from converter.detector_example import SHAPES_STD
from converter.examples import (
    COLORS_STD,
    DIGITS_STD,
    EXAMPLES,
    ExampleFiles,
)
from converter.pipeline import ConvertOptions, run_convert
from tests.model_factory import prebuilt

_trained: dict[tuple[str, int], ExampleFiles] = {}


def _example(which: str, seed: int) -> ExampleFiles:
    if (which, seed) not in _trained:
        workdir = Path(tempfile.mkdtemp(prefix=f"edge-{which}-"))
        atexit.register(shutil.rmtree, workdir, True)
        build: Any = EXAMPLES[which]
        _trained[which, seed] = build(workdir / f"{which}.keras", seed=seed)
    return _trained[which, seed]


def digits_example(seed: int = 0) -> ExampleFiles:
    """The digits Keras model and its data, trained on first use (about 10 s). Another
    seed: another train/validation split and other initial weights (a retrained model)."""
    return _example("digits", seed)


def colors_example(seed: int = 0) -> ExampleFiles:
    """The colors Keras model (16x16 RGB, six colours) and its data, trained on first use
    (a few seconds). Another seed: other drawn patches and weights (a retrained model)."""
    return _example("colors", seed)


def shapes_example(seed: int = 0) -> ExampleFiles:
    """The shapes detector (32x32 RGB, four colours of squares) and its data, trained on
    first use (about 15 s)."""
    return _example("shapes", seed)


def digits_name(name: str, version: str, samples: int, task: Task, seed: int = 0) -> str:
    return f"bundle-{name}-v{version}-{samples}-{task}" + (f"-seed{seed}" if seed else "")


def colors_name(name: str, version: str, samples: int, seed: int = 0) -> str:
    return f"bundle-{name}-v{version}-{samples}-seed{seed}"


def shapes_name(name: str, version: str, samples: int, seed: int = 0) -> str:
    return f"bundle-{name}-v{version}-{samples}-detect-seed{seed}"


def build_digits_bundle(
    dest_dir: Path,
    version: str = "1",
    sign_key: Path | None = None,
    *,
    name: str = "digits",
    samples: int = 100,
    task: Task = "classify",
    seed: int = 0,
) -> Path:
    """A full-integer int8 digits bundle at ``dest_dir``, validated and (with a key) signed."""
    if _copied(digits_name(name, version, samples, task, seed), dest_dir, sign_key):
        return dest_dir
    _convert(
        digits_example(seed),
        dest_dir,
        name,
        version,
        samples,
        sign_key,
        Preprocess(std=[DIGITS_STD]),
        task=task,
    )
    return dest_dir


def build_colors_bundle(
    dest_dir: Path,
    version: str = "1",
    sign_key: Path | None = None,
    *,
    name: str = "colors",
    samples: int = 100,
    seed: int = 0,
) -> Path:
    """A full-integer int8 colors bundle (RGB input, ``--std 255``) at ``dest_dir``,
    validated and (with a key) signed. ``seed=1`` is the good "retrained" candidate."""
    if _copied(colors_name(name, version, samples, seed), dest_dir, sign_key):
        return dest_dir
    _convert(
        colors_example(seed),
        dest_dir,
        name,
        version,
        samples,
        sign_key,
        Preprocess(std=[COLORS_STD], color="rgb"),
    )
    return dest_dir


def build_shapes_bundle(
    dest_dir: Path,
    version: str = "1",
    sign_key: Path | None = None,
    *,
    name: str = "shapes",
    samples: int = 100,
    seed: int = 0,
) -> Path:
    """A full-integer int8 detector bundle (``--task detect``, RGB, ``--std 255``) at
    ``dest_dir``: four outputs as the agent's ``Detector`` reads them."""
    if _copied(shapes_name(name, version, samples, seed), dest_dir, sign_key):
        return dest_dir
    _convert(
        shapes_example(seed),
        dest_dir,
        name,
        version,
        samples,
        sign_key,
        Preprocess(std=[SHAPES_STD], color="rgb"),
        task="detect",
    )
    return dest_dir


def _convert(
    example: ExampleFiles,
    dest_dir: Path,
    name: str,
    version: str,
    samples: int,
    sign_key: Path | None,
    preprocess: Preprocess,
    task: Task = "classify",
) -> None:
    """Convert an example model with its own calibration, validation data and labels."""
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
            preprocess=preprocess,
            sign_key=sign_key,
            task=task,
            progress=False,
        )
    )


def _copied(prebuilt_name: str, dest_dir: Path, sign_key: Path | None) -> bool:
    """True when ``dest_dir`` is now a copy of a prebuilt bundle (signed with ``sign_key``)."""
    if not prebuilt(prebuilt_name, dest_dir):
        return False
    key = load_signing_key(sign_key)
    if key is not None:
        sign_bundle(dest_dir, key)
    return True
