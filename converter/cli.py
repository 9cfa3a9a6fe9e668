"""``edge-convert``: Keras/SavedModel -> signed int8 TFLite bundle, and the tools around it.

Exit codes: 0 ok, 1 a bundle that fails ``verify``, 2 bad input (one line naming
the cause, nothing written), 3 the accuracy gate failed (nothing published).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.models.decoder_spec import DECODER_TYPES
from agent.models.manifest import TASKS
from converter import __version__
from converter.errors import EXIT_BAD_BUNDLE, EXIT_OK, ConverterError
from converter.tfimport import import_runtimes_first

PROG = "edge-convert"


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    else:
        print(text)


def _preprocess(args: argparse.Namespace) -> Any:
    from agent.models.manifest import Preprocess

    return Preprocess(mean=args.mean, std=args.std, color=args.color)


def _labels(args: argparse.Namespace) -> list[str] | None:
    from converter.bundle import read_labels

    return read_labels(args.labels) if args.labels else None


def _decoder(args: argparse.Namespace) -> dict[str, Any] | None:
    """The decoder spec as the options give it (``type`` missing: recognised later)."""
    spec: dict[str, Any] = {}
    if args.decoder_json:
        try:
            spec = json.loads(args.decoder_json)
        except ValueError as exc:
            raise ConverterError(f"--decoder-json is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConverterError("--decoder-json must be a JSON object")
    if args.decoder:
        spec["type"] = args.decoder
    for key in ("iou", "max_detections", "class_agnostic"):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    return spec or None


def _cmd_convert(args: argparse.Namespace) -> int:
    from converter.pipeline import ConvertOptions, run_convert

    result = run_convert(
        ConvertOptions(
            model=args.model,
            out=args.output,
            calib=args.calib,
            val=args.val,
            samples=args.samples,
            quantization=args.quant,
            task=args.task,
            labels=args.labels,
            name=args.name,
            version=args.version,
            preprocess=_preprocess(args),
            max_drop=args.max_drop,
            sign_key=args.sign_key,
            progress=not args.json,
            golden=args.golden,
            decoder=_decoder(args),
            input_shape=args.input_shape,
            input_layout=args.input_layout,
        )
    )
    text = (
        f"{result['bundle']}: {result['name']} {result['version']} {result['quantization']}, "
        f"{result['model_bytes']} bytes ({result['size_ratio']:.2f} of float)"
    )
    if result["accuracy_drop"] is not None:
        text += (
            f"\n  accuracy float {result['float_accuracy']:.4f} -> tflite "
            f"{result['int8_accuracy']:.4f} (drop {result['accuracy_drop'] * 100:.2f} points), "
            f"top-1 agreement {result['top1_agreement']:.4f}"
        )
    elif args.val is None:
        text += "\n  not validated (no --val): accuracy gate not applied"
    text += "\n  " + _health_line(result)
    _emit(args, result, text)
    return EXIT_OK


def _health_line(result: dict[str, Any]) -> str:
    reference = (
        f"reference statistics from {result['reference_samples']} samples"
        if result["reference_samples"]
        else "no reference statistics (no --val)"
    )
    return f"{reference}, {result['golden_samples']} golden samples"


def _cmd_bundle(args: argparse.Namespace) -> int:
    from converter.bundle import BundleSpec, check_name, load_signing_key, wrap_tflite

    spec = BundleSpec(
        name=check_name(args.name or args.model.stem, "name"),
        version=check_name(args.version, "version"),
        task=args.task,
        labels=_labels(args),
        preprocess=_preprocess(args),
        decoder=_decoder(args),
        state=args.state,
    )
    manifest = wrap_tflite(
        args.model,
        args.output,
        spec,
        load_signing_key(args.sign_key),
        val=args.val,
        golden=args.golden,
        samples=args.samples,
        input_shapes=args.input_shape,
    )
    data = {
        "bundle": str(args.output.resolve()),
        "name": manifest["name"],
        "version": manifest["version"],
        "quantization": manifest["quantization"],
        "sha256": manifest["model"]["sha256"],
        "model_bytes": manifest["model"]["size"],
        "signed": args.sign_key is not None,
        "reference_samples": (manifest.get("reference") or {}).get("samples", 0),
        "golden_samples": len((manifest.get("golden") or {}).get("samples", [])),
    }
    _emit(
        args,
        data,
        f"{data['bundle']}: {data['name']} {data['version']} {data['quantization']}"
        f"{', signed' if data['signed'] else ''}\n  {_health_line(data)}",
    )
    return EXIT_OK


def _cmd_keygen(args: argparse.Namespace) -> int:
    from agent.models.manifest import generate_keypair

    keydir: Path = args.output
    private, public = keydir / "signing.key", keydir / "signing.pub"
    for path in (private, public):
        if path.exists():
            raise ConverterError(f"{path}: already exists; refusing to overwrite a key")
    if keydir.exists() and not keydir.is_dir():
        raise ConverterError(f"{keydir}: not a directory")
    keydir.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem = generate_keypair()
    # O_EXCL: never clobber a key that appeared meanwhile; 0600 from the first byte.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public.write_bytes(public_pem)
    print(f"wrote {private} (keep it secret) and {public} (give it to the devices)")
    return EXIT_OK


def _cmd_sign(args: argparse.Namespace) -> int:
    from agent.models.manifest import BundleError, load_private_key
    from converter.bundle import sign_bundle

    try:
        manifest = sign_bundle(args.bundle, load_private_key(args.key))
    except BundleError as exc:
        raise ConverterError(str(exc)) from None
    print(f"signed {args.bundle}: {manifest['name']} {manifest['version']}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from agent.models.manifest import BundleError, load_public_key, verify_bundle

    try:
        key = load_public_key(args.pub)
    except BundleError as exc:
        raise ConverterError(str(exc)) from None
    try:
        bundle = verify_bundle(args.bundle, [key], require_signature=True)
    except BundleError as exc:
        print(f"{args.bundle}: FAILED: {exc}", file=sys.stderr)
        return EXIT_BAD_BUNDLE
    m = bundle.manifest
    print(f"{args.bundle}: ok ({m.name} {m.version}, sha256 {m.model.sha256[:12]}…)")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from converter.inspect import describe, format_description

    info = describe(args.path)
    _emit(args, info, format_description(info))
    return EXIT_OK


def _cmd_example(args: argparse.Namespace) -> int:
    from converter.examples import EXAMPLES

    files = EXAMPLES[args.which](args.output)
    written = [str(p) for p in (files.model, files.calib, files.val, files.labels) if p]
    print("wrote " + ", ".join(written))
    return EXIT_OK


def _shape(text: str) -> list[int]:
    """``--input-shape 1,128,128,3``: comma-separated positive ints."""
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated positive integers, e.g. 1,128,128,3"
        )
    return dims


def _add_bundle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", default="1", help="model version (default: 1)")
    p.add_argument("--task", choices=TASKS, default="classify")
    p.add_argument(
        "--decoder",
        choices=DECODER_TYPES,
        help="--task detect: how outputs become boxes (default: recognised from the outputs)",
    )
    p.add_argument("--iou", type=float, help="yolo/anchors: NMS overlap (default 0.45 / 0.3)")
    p.add_argument("--max-detections", type=int, help="yolo/anchors: boxes per frame (100)")
    p.add_argument(
        "--class-agnostic",
        action="store_true",
        default=None,
        help="yolo: suppress overlaps across classes too (default: per class)",
    )
    p.add_argument(
        "--decoder-json",
        metavar="JSON",
        help='the full decoder spec, e.g. \'{"type": "anchors", "strides": [8, 16], ...}\'',
    )
    p.add_argument("--labels", type=Path, help="labels file, one per line, in class order")
    p.add_argument("--mean", type=float, nargs="+", default=[0.0], help="per channel or one")
    p.add_argument("--std", type=float, nargs="+", default=[1.0], help="per channel or one")
    p.add_argument("--color", choices=("rgb", "bgr", "gray"), default="rgb")
    p.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) to sign with")
    p.add_argument(
        "--golden",
        type=int,
        default=4,
        metavar="N",
        help="golden samples a device checks before serving the model (default 4, 0 = none); "
        "taken from --val (convert without --val: from --calib)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="Keras, SavedModel or PyTorch model -> checked, signed TFLite bundle"
    )
    p.add_argument(
        "model",
        type=Path,
        help=".keras, .h5, a SavedModel directory; PyTorch (the torch extra): .pt2 (an "
        "exported program), module:factory (returns the nn.Module) or TorchScript (.pt, .ts)",
    )
    p.add_argument("--calib", type=Path, help="calibration data: image folder, .npy, .npz, .csv")
    p.add_argument("--val", type=Path, help="validation data (labels from y or class folders)")
    p.add_argument("--samples", type=int, default=300, help="calibration samples (default 300)")
    p.add_argument(
        "--quant", choices=("int8", "int8-float-io", "float16", "dynamic"), default="int8"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="largest accepted accuracy drop, as a fraction (default 0.01 = 1 point)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="DIMS",
        help="a Keras model's input shape with its unknown dims chosen, e.g. 1,128,128,3: "
        "the model is converted at that shape; a PyTorch factory's or TorchScript's example "
        "input as the module takes it, e.g. 1,3,224,224",
    )
    p.add_argument(
        "--input-layout",
        choices=("nchw", "nhwc"),
        default="nchw",
        help="PyTorch: the module's image layout (default nchw, PyTorch's own); the bundle "
        "takes NHWC either way",
    )
    _add_bundle_options(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("bundle", help="wrap an existing .tflite into a bundle")
    p.add_argument("model", type=Path, help="the .tflite file")
    p.add_argument(
        "--val",
        type=Path,
        help="data to record reference statistics and golden samples from "
        "(image folder, .npy, .npz, .csv; preprocessed by --mean/--std/--color)",
    )
    p.add_argument("--samples", type=int, help="use at most this many --val samples")
    p.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        metavar="DIMS",
        help="the shape to run an input with dynamic dims at, e.g. 1,128,128,3 (recorded in "
        "the manifest; devices resize to it); repeat for several inputs, in input order",
    )
    p.add_argument(
        "--state",
        action="append",
        metavar="INPUT:OUTPUT",
        help="a streaming model's state: OUTPUT (a tensor name) is fed back to INPUT at the "
        "next window; repeat per pair",
    )
    _add_bundle_options(p)
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser("keygen", help="new Ed25519 signing key pair")
    p.add_argument("-o", "--output", type=Path, required=True, help="key directory")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("sign", help="sign a bundle in place")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("verify", help="check a bundle's model checksum and signature")
    p.add_argument("bundle", type=Path)
    p.add_argument("--pub", type=Path, required=True, help="Ed25519 public key (PEM)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("inspect", help="inputs, outputs, quantisation and ops of a model")
    p.add_argument("path", type=Path, help="a .tflite file or a bundle directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("example", help="write an example model and its data")
    p.add_argument("which", choices=("digits", "colors", "shapes", "mobilenet", "digits-torch"))
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="FILE.keras (digits-torch: FILE.pt2)"
    )
    p.set_defaults(func=_cmd_example)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import_runtimes_first()  # before anything can import TensorFlow
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConverterError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
