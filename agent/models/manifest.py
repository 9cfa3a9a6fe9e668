"""Model bundles: the manifest, its Ed25519 signature, and reading and writing bundles.

A bundle is a directory holding ``model.tflite``, ``manifest.json`` and, when
signed, ``manifest.sig``. The manifest carries the model's sha256 and size, so a
signature over the manifest covers the model too.

The signature is Ed25519 over the *canonical bytes* of the manifest: the JSON
object re-serialised with sorted keys, no insignificant whitespace and UTF-8
(``canonical_bytes``). ``manifest.sig`` holds the 64-byte signature in base64.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public).

The converter and the fleet console import this module; it must not import
TensorFlow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.models.decoder_spec import Decoder
from agent.models.golden import Golden
from agent.models.health import Reference
from agent.protocol import Name, format_validation_error

MANIFEST_FORMAT = 1
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"


class BundleError(Exception):
    """A bundle, manifest, key or signature that cannot be used; one-line message."""


class ManifestError(BundleError):
    pass


class SignatureError(BundleError):
    pass


class ChecksumError(BundleError):
    pass


# --------------------------------------------------------------------------- model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    shape: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class ModelFile(_Strict):
    file: Literal["model.tflite"] = "model.tflite"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)


class AudioFeatures(_Strict):
    """An audio model's front end: the raw waveform, or a log-mel spectrogram (power of
    a Hann-windowed rfft of ``n_fft`` samples every ``hop`` samples, ``n_mels`` HTK mel
    bands from ``fmin`` to ``fmax`` Hz, natural log of power + 1e-6)."""

    sample_rate: int = Field(default=16000, ge=1000, le=192_000)
    features: Literal["waveform", "log_mel"] = "log_mel"
    n_fft: int = Field(default=512, ge=16, le=8192)
    hop: int = Field(default=160, ge=1)
    n_mels: int = Field(default=40, ge=1, le=512)
    fmin: float = Field(default=20.0, ge=0)
    fmax: float | None = Field(default=None, gt=0, description="none: sample_rate / 2")


class Preprocess(_Strict):
    """How a frame becomes the model's input before quantisation; for audio, ``mean``
    and ``std`` apply to the features."""

    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    layout: Literal["NHWC", "NCHW", "NC"] = "NHWC"
    audio: AudioFeatures | None = None


class Metrics(_Strict):
    float_accuracy: float | None = None
    int8_accuracy: float | None = None
    accuracy_drop: float | None = None
    top1_agreement: float | None = None
    sqnr_db: list[float] = Field(default_factory=list)
    samples: int = 0


class Calibration(_Strict):
    samples: int
    sha256: str


class Producer(_Strict):
    converter: str
    tensorflow: str | None = None


class StateLink(_Strict):
    """A streaming model's state: what ``output`` holds after one window is fed to
    ``input`` with the next (tensor names; equal shape and dtype)."""

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


# classify: class scores; detect: boxes (see ``decoder``); keypoints: one pose's named
# points; segment: per-pixel classes summarised; keyword: an audio window's keyword;
# raw: the tensors (or their summaries past a size).
Task = Literal["classify", "detect", "keypoints", "segment", "keyword", "raw"]
TASKS: tuple[str, ...] = ("classify", "detect", "keypoints", "segment", "keyword", "raw")


class Manifest(_Strict):
    format: Literal[1] = 1
    name: Name
    version: Name
    created_at: str
    task: Task
    quantization: Literal["int8", "int8-float-io", "float16", "dynamic", "none"]
    model: ModelFile
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] | None = None
    # detect only: how the outputs become boxes; none: SSD post-processing op outputs.
    decoder: Decoder | None = None
    preprocess: Preprocess = Preprocess()
    metrics: Metrics | None = None
    calibration: Calibration | None = None
    producer: Producer
    # What the outputs looked like on the validation set (drift, shadow distance).
    reference: Reference | None = None
    # A few inputs and the outputs the converter's runtime gave (checked at validation).
    golden: Golden | None = None
    # Streaming models: state carried from outputs to inputs between windows. The first
    # input that is not a state input is the frame's.
    state: list[StateLink] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _state_names(self) -> Manifest:
        if self.state:
            check_state_names(self.state, self.inputs, self.outputs)
        return self

    @property
    def frame_input(self) -> int:
        """Index of the input the frame is fed to: the first that is not a state input."""
        return frame_input_index([t.name for t in self.inputs], self.state)


def check_state_names(
    links: list[StateLink], inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> None:
    """Each link names an input and an output of the model, once each, and leaves an
    input for the frame (ValueError, one line)."""
    in_names = [t.name for t in inputs]
    out_names = [t.name for t in outputs]
    for link in links:
        if link.input not in in_names:
            raise ValueError(f"state input {link.input!r} is not a model input {in_names}")
        if link.output not in out_names:
            raise ValueError(f"state output {link.output!r} is not a model output {out_names}")
    for what, names in (("input", [x.input for x in links]), ("output", [x.output for x in links])):
        if len(set(names)) != len(names):
            raise ValueError(f"a state {what} is linked twice: {names}")
    if len(links) >= len(inputs):
        raise ValueError("every input is a state input: none is left for the frame")


def frame_input_index(names: list[str], state: list[StateLink] | None) -> int:
    stateful = {link.input for link in state or ()}
    return next(i for i, name in enumerate(names) if name not in stateful)


def parse_manifest(data: Mapping[str, Any]) -> Manifest:
    """Validate a manifest object; ``ManifestError`` names every bad key path."""
    if not isinstance(data, Mapping):
        raise ManifestError("manifest must be a JSON object")
    try:
        return Manifest.model_validate(dict(data))
    except ValidationError as err:
        raise ManifestError(f"invalid manifest: {format_validation_error(err, data)}") from None


def input_shapes(manifest: Manifest) -> list[list[int]]:
    """The input shapes a model is fed: a .tflite whose inputs are dynamic is resized
    to them at load (``agent.models.runtime.load_model``)."""
    return [list(t.shape) for t in manifest.inputs]


def input_shapes_beside(model_path: Path) -> list[list[int]] | None:
    """The input shapes of the manifest in a model file's bundle or store directory, or
    None without a readable one (the store checked it when the version came in)."""
    try:
        data = load_manifest_data(model_path.parent / MANIFEST_FILE)
        return [[int(d) for d in t["shape"]] for t in data["inputs"]]
    except (ManifestError, KeyError, TypeError, ValueError):
        return None


def load_manifest_data(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a JSON manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: manifest must be a JSON object")
    return data


# ----------------------------------------------------------------- bytes and keys


def canonical_bytes(data: Mapping[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"{path}: private key not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise SignatureError(f"{path}: public key not found") from None
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key, for logs and error messages."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(data: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The base64 signature of the manifest's canonical bytes."""
    return base64.b64encode(key.sign(canonical_bytes(data))).decode("ascii")


def verify_signature(
    data: Mapping[str, Any], signature: str | None, keys: Iterable[Ed25519PublicKey]
) -> str:
    """Check ``signature`` against each trusted key; returns the key id that verifies."""
    keys = list(keys)
    if signature is None:
        raise SignatureError("bundle is not signed (no manifest.sig)")
    if not keys:
        raise SignatureError("no trusted public keys to verify the signature with")
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("manifest.sig is not base64") from None
    message = canonical_bytes(data)
    for key in keys:
        try:
            key.verify(raw, message)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError("manifest.sig does not verify with any trusted key")


# ------------------------------------------------------------------------ bundles


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    manifest_data: dict[str, Any]
    signature: str | None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def read_bundle(path: Path) -> Bundle:
    """Read a bundle directory and validate its manifest (no checksum or signature check)."""
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    data = load_manifest_data(path / MANIFEST_FILE)
    manifest = parse_manifest(data)
    sig_path = path / SIGNATURE_FILE
    signature = sig_path.read_text(encoding="ascii").strip() if sig_path.exists() else None
    return Bundle(path, manifest, data, signature)


def check_model_file(path: Path, manifest: Manifest) -> None:
    """Size and sha256 of the model file against the manifest."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ChecksumError(f"{path}: model file missing") from None
    if size != manifest.model.size:
        raise ChecksumError(
            f"model file is {size} bytes, manifest says {manifest.model.size} (truncated?)"
        )
    digest = sha256_file(path)
    if digest != manifest.model.sha256:
        raise ChecksumError(
            f"model sha256 {digest[:12]}… does not match manifest {manifest.model.sha256[:12]}…"
        )


def verify_bundle(
    path: Path, keys: Iterable[Ed25519PublicKey] = (), *, require_signature: bool = True
) -> Bundle:
    """Read a bundle and check its model file and (when required or present) signature."""
    bundle = read_bundle(path)
    check_model_file(bundle.model_path, bundle.manifest)
    keys = list(keys)
    if require_signature or (bundle.signature is not None and keys):
        verify_signature(bundle.manifest_data, bundle.signature, keys)
    return bundle


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(
    dest: Path,
    model: Path | bytes,
    manifest_data: Mapping[str, Any],
    signature: str | None = None,
) -> Path:
    """Write a bundle directory atomically: built beside ``dest``, then renamed into place.

    An existing bundle at ``dest`` is replaced only once the new one is complete.
    """
    parse_manifest(manifest_data)
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        target = tmp / MODEL_FILE
        if isinstance(model, bytes):
            target.write_bytes(model)
        else:
            shutil.copyfile(model, target)
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest_data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        if signature is not None:
            (tmp / SIGNATURE_FILE).write_text(signature + "\n", encoding="ascii")
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
