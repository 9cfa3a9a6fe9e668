"""The model-health material: broken candidates differ from the good bundle only where
they say and still verify; each is wrong on the colors scene as the device would run
it (the pipeline's own preprocessing, a real runtime); the scene's drift moves a good
model's output distribution far from its reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import config as c
from agent.loops.preprocess import ImagePreprocessor
from agent.loops.sources.synthetic import COLOR_BANK, SyntheticFrames
from agent.models.golden import (
    Golden,
    GoldenSample,
    OutputCheck,
    compare,
    pack_input,
    pack_output,
    unpack_input,
)
from agent.models.health import OutputWindow, Reference, classify_reference
from agent.models.manifest import (
    generate_keypair,
    load_private_key,
    load_public_key,
    read_bundle,
    sign_manifest,
    verify_bundle,
    write_bundle,
)
from agent.models.runtime import load_model
from tests import health_support as hs
from tests.converter_support import build_colors_bundle, build_digits_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    keydir = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair()
    (keydir / "signing.key").write_bytes(private)
    (keydir / "signing.pub").write_bytes(public)
    return keydir / "signing.key", keydir / "signing.pub"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return build_colors_bundle(tmp_path_factory.mktemp("good") / "colors-v1", "1", keys[0])


def scene(drift: bool = False, n: int = COLOR_BANK) -> tuple[list[np.ndarray], np.ndarray]:
    """What the synthetic colors source gives a pipeline: BGR frames, larger than the model."""
    source = SyntheticFrames(
        c.SyntheticSource(
            type="synthetic", kind="colors", width=48, height=32, drift_after_s=0 if drift else None
        )
    )
    source.open()
    reads = [source.read() for _ in range(n)]
    return [f for f, _ in reads], np.array([m["label"] for _, m in reads])


class Deployed:
    """A bundle run as a pipeline runs it: its manifest's preprocessing, then the model."""

    def __init__(self, bundle: Path) -> None:
        self.manifest = read_bundle(bundle).manifest
        self.loaded = load_model(bundle / "model.tflite")
        (self.inp,), (self.out,) = self.loaded.inputs, self.loaded.outputs
        self.prepare = ImagePreprocessor(self.inp, self.manifest.preprocess)

    def scores(self, frames: list[np.ndarray]) -> np.ndarray:
        rows = []
        for frame in frames:
            tensor, _ = self.prepare(frame)
            self.loaded.interpreter.set_tensor(self.inp.index, tensor)
            self.loaded.interpreter.invoke()
            rows.append(self.out.dequantize(self.loaded.interpreter.get_tensor(self.out.index)))
        return np.concatenate(rows)

    def labels(self, frames: list[np.ndarray]) -> list[str]:
        assert self.manifest.labels is not None
        return [self.manifest.labels[i] for i in self.scores(frames).argmax(axis=1)]


def manifest_changes(a: dict[str, Any], b: dict[str, Any], path: str = "") -> set[str]:
    """Key paths whose values differ between two manifests."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {
            p
            for k in a.keys() | b.keys()
            for p in manifest_changes(a.get(k), b.get(k), f"{path}{k}.")
        }
    return set() if a == b else {path.rstrip(".")}


@pytest.mark.parametrize(
    ("maker", "changed"),
    [
        (hs.wrong_normalisation, {"preprocess.std"}),
        (hs.swapped_channels, {"preprocess.color"}),
        (hs.shuffled_labels, {"labels"}),
    ],
)
def test_broken_candidate_verifies_and_differs_only_where_intended(
    maker: Any, changed: set[str], good: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    broken = maker(good, tmp_path / "broken", private)
    checked = verify_bundle(broken, [load_public_key(public)], require_signature=True)
    original = read_bundle(good)
    assert (broken / "model.tflite").read_bytes() == original.model_path.read_bytes()
    assert manifest_changes(original.manifest_data, checked.manifest_data) == changed | {"version"}
    assert checked.manifest.version != original.manifest.version
    # The key may be given loaded, and the version chosen.
    again = maker(good, tmp_path / "again", load_private_key(private), version="7")
    assert read_bundle(again).manifest.version == "7"


def test_shuffled_labels_rename_every_class(good: Path, keys: tuple[Path, Path], tmp_path: Path):
    labels = read_bundle(good).manifest.labels
    shuffled = read_bundle(hs.shuffled_labels(good, tmp_path / "b", keys[0])).manifest.labels
    assert labels and shuffled and sorted(shuffled) == sorted(labels)
    assert all(a != b for a, b in zip(labels, shuffled, strict=True))


def test_makers_refuse_a_change_that_changes_nothing(keys: tuple[Path, Path], tmp_path: Path):
    digits = build_digits_bundle(tmp_path / "digits", "1", keys[0])  # one grey channel
    with pytest.raises(ValueError, match="no colour order to swap"):
        hs.swapped_channels(digits, tmp_path / "swapped", keys[0])
    with pytest.raises(ValueError, match="already has mean"):
        hs.wrong_normalisation(digits, tmp_path / "same", keys[0], std=[255.0])
    assert not (tmp_path / "swapped").exists() and not (tmp_path / "same").exists()


def test_broken_candidates_are_wrong_where_the_good_ones_are_right(
    good: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    frames, truth = scene()
    active = Deployed(good)
    names = active.manifest.labels
    assert names is not None
    expected = [names[i] for i in truth]

    def accuracy(bundle: Path) -> float:
        return float(np.mean(np.array(Deployed(bundle).labels(frames)) == expected))

    assert accuracy(good) >= 0.9
    assert accuracy(hs.retrained(tmp_path / "retrained", keys[0])) >= 0.9
    assert accuracy(hs.swapped_channels(good, tmp_path / "swapped", keys[0])) < 0.35
    assert accuracy(hs.wrong_normalisation(good, tmp_path / "scale", keys[0])) < 0.35
    assert accuracy(hs.shuffled_labels(good, tmp_path / "labels", keys[0])) < 0.35


def test_scene_drift_moves_the_output_distribution_off_its_reference(good: Path) -> None:
    active = Deployed(good)
    steady_frames, _ = scene()
    reference = Reference(
        samples=COLOR_BANK, classify=classify_reference(active.scores(steady_frames))
    )
    distances = {}
    for drift in (False, True):
        window = OutputWindow(reference, size=COLOR_BANK, min_frames=COLOR_BANK)
        for row in active.scores(scene(drift)[0]):
            p = np.exp(row - row.max())
            p /= p.sum()
            window.add_classes(int(p.argmax()), float(p.max()))
        distances[drift] = window.figures().distance
    assert distances[False] is not None and distances[False] < 0.1
    assert distances[True] is not None and distances[True] > 0.5


def resigned(bundle: Path, dest: Path, key: Path, **changes: Any) -> Path:
    """``bundle`` at ``dest`` with top-level manifest keys changed (None: removed), signed."""
    data = {
        k: v for k, v in {**read_bundle(bundle).manifest_data, **changes}.items() if v is not None
    }
    signature = sign_manifest(data, load_private_key(key))
    return write_bundle(dest, bundle / "model.tflite", data, signature)


def with_golden(bundle: Path, dest: Path, key: Path, samples: int = 3) -> Path:
    """``bundle`` with golden samples (frames of the scene and the outputs the runtime
    gives them), as the converter writes them, whether or not this converter does."""
    loaded = load_model(bundle / "model.tflite")
    (inp,), outputs = loaded.inputs, loaded.outputs
    prepare = ImagePreprocessor(inp, read_bundle(bundle).manifest.preprocess)
    packed = []
    for frame in scene(n=samples)[0]:
        tensor, full = pack_input(prepare(frame)[0], 4096)
        loaded.interpreter.set_tensor(inp.index, full)
        loaded.interpreter.invoke()
        outs = [pack_output(loaded.interpreter.get_tensor(o.index)) for o in outputs]
        packed.append(GoldenSample(inputs=[tensor], outputs=outs))
    golden = Golden(runtime=loaded.runtime.name, samples=packed)
    return resigned(bundle, dest, key, golden=golden.model_dump(mode="json"))


def golden_checks(bundle: Path, golden: Golden) -> list[OutputCheck]:
    """The device's side: run each golden input, compare each output."""
    loaded = load_model(bundle / "model.tflite")
    checks = []
    for i, sample in enumerate(golden.samples):
        loaded.interpreter.set_tensor(loaded.inputs[0].index, unpack_input(sample.inputs[0]))
        loaded.interpreter.invoke()
        for j, out in enumerate(loaded.outputs):
            actual = loaded.interpreter.get_tensor(out.index)
            checks.append(compare(golden, i, j, actual, out.scale))
    return checks


def test_perturbed_golden_outputs_fail_the_golden_check(
    good: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    source = with_golden(good, tmp_path / "golden", private)
    broken = hs.perturbed_golden(source, tmp_path / "broken", private)
    checked = verify_bundle(broken, [load_public_key(public)], require_signature=True)
    original = read_bundle(source)
    changed = manifest_changes(original.manifest_data, checked.manifest_data)
    assert changed == {"golden.samples", "version"}
    assert original.manifest.golden is not None and checked.manifest.golden is not None
    assert all(ch.over == 0 for ch in golden_checks(broken, original.manifest.golden))
    # Every value off by more than the tolerance: what a runtime computing wrong int8 gives.
    checks = golden_checks(broken, checked.manifest.golden)
    assert checks and all(ch.over == ch.checked > 0 for ch in checks)
    assert min(ch.worst for ch in checks) > checked.manifest.golden.tolerance_steps
    without = resigned(good, tmp_path / "plain", private, golden=None)
    with pytest.raises(ValueError, match="no golden samples"):
        hs.perturbed_golden(without, tmp_path / "nothing", private)
