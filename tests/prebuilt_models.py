"""The models the tests build with TensorFlow, built once in the main venv for the
device venvs of `make test-pythons`, which have no TensorFlow (tests/device_venv.py).

    python -m tests.prebuilt_models ~/.cache/edge-deploy    # prints the models' directory

The directory is named after a hash of everything that shapes the models (the builders,
the converter, the manifest format, the workstation's pins), so a change rebuilds it.
Each builder, given ``EDGE_TEST_MODELS``, copies the file built here for its arguments.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tests import converter_support, keyword_models, lifecycle_support, model_factory

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "tests/prebuilt_models.py",
    "tests/model_factory.py",
    "tests/converter_support.py",
    "tests/lifecycle_support.py",
    "tests/keyword_models.py",
    "agent/loops/audio_features.py",
    "agent/models/manifest.py",
    "agent/models/health.py",
    "agent/models/golden.py",
    "constraints/workstation.txt",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "converter").rglob("*.py")),
    "agent/scenes.py",  # draws the colors example's data
]

# name -> builder(dest), one per set of arguments some test passes.
MODELS: dict[str, Callable[[Path], object]] = {
    model_factory.tiny_name((8, 8, 1), 10, True, 0): model_factory.build_tiny_classifier,
    model_factory.tiny_name((8, 8, 1), 10, False, 0): lambda d: model_factory.build_tiny_classifier(
        d, int8=False
    ),
    model_factory.tiny_name((8, 8, 1), 10, True, 7): lambda d: model_factory.build_tiny_classifier(
        d, seed=7
    ),
    model_factory.slow_name((8, 8, 1), 10, 8): model_factory.build_slow_classifier,
    lifecycle_support.NAN_MODEL: lifecycle_support.build_nan_classifier,
    **{
        converter_support.digits_name("digits", v, 100, "classify"): (
            lambda d, v=v: converter_support.build_digits_bundle(d, v)
        )
        for v in ("1", "2", "3")
    },
    # Model health: a retrained digits model, the colors model and its retrained peer, and
    # the shapes detector.
    converter_support.digits_name("digits", "2", 100, "classify", 1): (
        lambda d: converter_support.build_digits_bundle(d, "2", seed=1)
    ),
    **{
        converter_support.colors_name("colors", v, 100, seed): (
            lambda d, v=v, seed=seed: converter_support.build_colors_bundle(d, v, seed=seed)
        )
        for v, seed in (("1", 0), ("2", 1))
    },
    converter_support.shapes_name("shapes", "1", 100): converter_support.build_shapes_bundle,
    keyword_models.KEYWORD_BUNDLE: keyword_models.build_keyword_bundle,
}


def models_dir(cache: Path) -> Path:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return cache / f"test-models-{digest.hexdigest()[:16]}"


def build(cache: Path) -> Path:
    """The models' directory under ``cache``, built unless it is there already."""
    dest = models_dir(cache)
    if dest.is_dir():
        return dest
    os.environ.pop(model_factory.PREBUILT_ENV, None)  # build them, do not look them up
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, builder in MODELS.items():
        builder(partial / name)
    partial.rename(dest)  # a run cut short leaves only a .partial, never a half cache
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.prebuilt_models CACHE_DIR")
    print(build(Path(sys.argv[1]).expanduser()))
