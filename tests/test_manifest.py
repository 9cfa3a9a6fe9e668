from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.models import manifest as mf


def manifest_for(model: bytes, **over: object) -> dict:
    data = {
        "format": 1,
        "name": "digits",
        "version": "1",
        "created_at": "2026-11-22T00:00:00Z",
        "task": "classify",
        "quantization": "int8",
        "model": {
            "file": "model.tflite",
            "sha256": hashlib.sha256(model).hexdigest(),
            "size": len(model),
        },
        "inputs": [{"name": "x", "shape": [1, 8, 8, 1], "dtype": "int8", "scale": 0.5}],
        "outputs": [{"name": "y", "shape": [1, 10], "dtype": "int8", "scale": 0.1}],
        "labels": [str(i) for i in range(10)],
        "producer": {"converter": "0.1.0"},
    }
    data.update(over)
    return data


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = mf.generate_keypair()
    (tmp_path / "k.key").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    return tmp_path / "k.key", tmp_path / "k.pub"


def signed_bundle(tmp_path: Path, keys: tuple[Path, Path], model: bytes = b"TFL3" * 64) -> Path:
    data = manifest_for(model)
    sig = mf.sign_manifest(data, mf.load_private_key(keys[0]))
    return mf.write_bundle(tmp_path / "bundle", model, data, sig)


def test_signed_bundle_verifies(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = signed_bundle(tmp_path, keys)
    bundle = mf.verify_bundle(path, [mf.load_public_key(keys[1])])
    assert bundle.manifest.name == "digits"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.tflite",
    ]


def test_signature_is_over_canonical_bytes_not_formatting(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = signed_bundle(tmp_path, keys)
    data = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(data, indent=7))  # reformatted, same content
    mf.verify_bundle(path, [mf.load_public_key(keys[1])])


@pytest.mark.parametrize("tamper", ["model", "manifest", "signature", "truncate"])
def test_tampering_is_caught(tmp_path: Path, keys: tuple[Path, Path], tamper: str) -> None:
    path = signed_bundle(tmp_path, keys)
    if tamper == "model":
        blob = bytearray((path / "model.tflite").read_bytes())
        blob[10] ^= 1
        (path / "model.tflite").write_bytes(bytes(blob))
    elif tamper == "truncate":
        (path / "model.tflite").write_bytes((path / "model.tflite").read_bytes()[:-1])
    elif tamper == "manifest":
        data = json.loads((path / "manifest.json").read_text())
        data["labels"][0] = "zero"
        (path / "manifest.json").write_text(json.dumps(data))
    else:
        (path / "manifest.sig").write_text("AAAA" * 22 + "\n")
    with pytest.raises(mf.BundleError):
        mf.verify_bundle(path, [mf.load_public_key(keys[1])])


def test_unknown_key_and_missing_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = signed_bundle(tmp_path, keys)
    other = mf.generate_keypair()[1]
    (tmp_path / "other.pub").write_bytes(other)
    with pytest.raises(mf.SignatureError, match="does not verify with any trusted key"):
        mf.verify_bundle(path, [mf.load_public_key(tmp_path / "other.pub")])
    (path / "manifest.sig").unlink()
    with pytest.raises(mf.SignatureError, match="not signed"):
        mf.verify_bundle(path, [mf.load_public_key(keys[1])])
    assert mf.verify_bundle(path, require_signature=False).signature is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"name": "../etc"}, "name:"),
        ({"version": "1/2"}, "version:"),
        ({"task": "segmentation"}, "task:"),
        ({"inputs": []}, "inputs:"),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_bad_manifests_name_the_key(change: dict, words: str) -> None:
    with pytest.raises(mf.ManifestError, match=words):
        mf.parse_manifest(manifest_for(b"x", **change))


def test_missing_field_is_named() -> None:
    data = manifest_for(b"x")
    del data["model"]["sha256"]
    with pytest.raises(mf.ManifestError, match="model.sha256: required key missing"):
        mf.parse_manifest(data)


def test_write_bundle_is_atomic_on_failure(tmp_path: Path) -> None:
    bad = manifest_for(b"x", task="nope")
    with pytest.raises(mf.ManifestError):
        mf.write_bundle(tmp_path / "out", b"x", bad)
    assert list(tmp_path.iterdir()) == []


def test_write_bundle_replaces_an_existing_bundle(tmp_path: Path) -> None:
    mf.write_bundle(tmp_path / "out", b"one", manifest_for(b"one"))
    mf.write_bundle(tmp_path / "out", b"two!", manifest_for(b"two!", version="2"))
    assert (tmp_path / "out/model.tflite").read_bytes() == b"two!"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_key_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(mf.SignatureError, match="not a PEM public key"):
        mf.load_public_key(tmp_path / "junk.pem")
    with pytest.raises(mf.SignatureError, match="not found"):
        mf.load_private_key(tmp_path / "none.key")
