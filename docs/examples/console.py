#!/usr/bin/env python3
"""A minimal edge-deploy console: ping a device, deploy a signed bundle, roll back.

Written from docs/protocol.md alone, as a stranger to this repository would: it uses
paho-mqtt (2.x) and the standard library, nothing of edge-deploy. It sends one
command to one device, prints the device's progress replies on stderr and the final
reply (one JSON line) on stdout, and exits 0 when that reply is ``done``, 1 when it
is ``failed`` (its ``code`` and ``message`` are printed on stderr), 2 when no final
reply came in time or the broker could not be reached.

    console.py --broker 127.0.0.1:1883 --device cam-1 ping
    console.py --broker ... --device cam-1 deploy BUNDLE --url http://host/model.tflite
    console.py --broker ... --device cam-1 deploy BUNDLE --serve 192.0.2.10:8765
    console.py --broker ... --device cam-1 deploy BUNDLE --chunks [--chunk-size 65536]
    console.py --broker ... --device cam-1 rollback MODEL [--to VERSION]

BUNDLE is a directory with manifest.json, manifest.sig (optional: a device that
requires signed models refuses a bundle without one) and the model file. ``--serve``
serves the bundle's directory over HTTP from this process, at an address the device
can reach; ``--chunks`` sends the model file over MQTT as the device asks for it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import queue
import sys
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

FINAL = ("done", "failed")
EXIT_DONE, EXIT_FAILED, EXIT_NO_ANSWER = 0, 1, 2


class Console:
    """One MQTT connection: sends commands to a device and reads what comes back."""

    def __init__(self, host: str, port: int, prefix: str, device: str) -> None:
        self.prefix = prefix
        self.device = device
        # Everything received, handled on the main thread: replies and chunk requests.
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._subscribed = threading.Event()
        # A console's client id must not be a device id: make it unique.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"console-{uuid.uuid4().hex[:12]}"
        )
        self.client.on_message = lambda _c, _u, msg: self.inbox.put((msg.topic, bytes(msg.payload)))
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()

    def subscribe(self, *topics: str) -> None:
        """Subscribe before sending: a reply that comes first is otherwise lost."""
        self._subscribed.clear()
        self.client.subscribe([(topic, 1) for topic in topics])
        if not self._subscribed.wait(10):
            raise ConnectionError("the broker did not acknowledge the subscription")

    def publish(self, topic: str, message: dict[str, Any]) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, json.dumps(message), qos=1)

    def send(self, command: dict[str, Any]) -> None:
        self.publish(f"{self.prefix}/{self.device}/cmd", command).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ChunkSender:
    """Publishes a file as Chunk messages, answering the device's ChunkRequests."""

    def __init__(self, console: Console, data: bytes, chunk_size: int) -> None:
        self.console = console
        self.data = data
        self.chunk_size = chunk_size
        self.total = max(1, -(-len(data) // chunk_size))  # ceil(size / chunk_size)
        self.transfer_id = f"t-{uuid.uuid4().hex[:12]}"
        self.topic = f"{console.prefix}/transfer/{self.transfer_id}"
        self.sent = 0

    def artifact(self) -> dict[str, Any]:
        return {
            "kind": "mqtt",
            "transfer_id": self.transfer_id,
            "chunk_size": self.chunk_size,
            "chunks": self.total,
        }

    def answer(self, request: dict[str, Any]) -> None:
        """Send every chunk a request lists (the first request lists them all, up to 1024)."""
        if request.get("transfer_id") != self.transfer_id:
            return
        for index in request.get("missing", []):
            if isinstance(index, int) and 0 <= index < self.total:
                body = self.data[index * self.chunk_size : (index + 1) * self.chunk_size]
                chunk = {
                    "transfer_id": self.transfer_id,
                    "index": index,
                    "total": self.total,
                    "data": base64.b64encode(body).decode("ascii"),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
                self.console.publish(self.topic, chunk)
                self.sent += 1


def command(op: str, **fields: Any) -> dict[str, Any]:
    now = time.time()
    return {"id": f"{op}-{uuid.uuid4().hex[:8]}", "op": op, "issued_at": now, **fields}


def wait_for_final(
    console: Console, command_id: str, timeout: float, chunks: ChunkSender | None = None
) -> dict[str, Any] | None:
    """Print the command's replies until its final one, which is returned (None: none came)."""
    reply_topic = f"{console.prefix}/{console.device}/reply"
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            topic, payload = console.inbox.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        try:
            message = json.loads(payload)
        except ValueError:
            continue
        if chunks is not None and topic == f"{chunks.topic}/missing":
            chunks.answer(message)
            continue
        if topic != reply_topic or message.get("id") != command_id:
            continue  # another console's command
        if message["status"] in FINAL:
            return dict(message)
        percent = message.get("percent")
        print(
            f"{command_id}: {message['status']} {message.get('stage') or message['code']}"
            + (f" {percent:.0f}%" if percent is not None else ""),
            file=sys.stderr,
        )
    return None


def read_bundle(path: Path) -> tuple[dict[str, Any], str | None, Path]:
    """(manifest as an object, signature text, model file).

    The manifest is sent exactly as manifest.json holds it, null values included: the
    signature covers its canonical form, so dropping or reformatting keys breaks it.
    """
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    sig_file = path / "manifest.sig"
    signature = sig_file.read_text(encoding="ascii").strip() if sig_file.exists() else None
    return manifest, signature, path / manifest["model"]["file"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_file(model: Path, address: str) -> tuple[ThreadingHTTPServer, str]:
    """Serve the model's directory over HTTP at ``host[:port]``; returns the file's URL."""
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    handler = functools.partial(_QuietHandler, directory=str(model.parent))
    server = ThreadingHTTPServer((host, int(port or 0)), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/{quote(model.name)}"


def deploy(console: Console, args: argparse.Namespace) -> dict[str, Any] | None:
    manifest, signature, model = read_bundle(Path(args.bundle))
    server, chunks = None, None
    if args.chunks:
        chunks = ChunkSender(console, model.read_bytes(), args.chunk_size)
        console.subscribe(f"{chunks.topic}/missing")
        artifact = chunks.artifact()
    elif args.serve:
        server, url = serve_file(model, args.serve)
        artifact = {"kind": "url", "url": url}
    else:
        artifact = {"kind": "url", "url": args.url}
    # A device that comes back online after the deadline must not install a stale model.
    cmd = command("deploy", expires_at=time.time() + args.timeout, manifest=manifest)
    cmd["artifact"] = artifact
    if signature is not None:
        cmd["signature"] = signature
    if args.no_shadow:
        cmd["shadow"] = False
    console.send(cmd)
    try:
        return wait_for_final(console, cmd["id"], args.timeout, chunks)
    finally:
        if server is not None:
            server.shutdown()
        if chunks is not None:
            print(f"{cmd['id']}: sent {chunks.sent} chunk message(s)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    try:
        console = Console(host, int(port or 1883), args.prefix, args.device)
    except OSError as exc:
        print(f"cannot connect to the broker {args.broker}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    try:
        console.subscribe(f"{args.prefix}/{args.device}/reply")
        if args.op == "deploy":
            final = deploy(console, args)
        else:
            if args.op == "rollback":
                cmd = command("rollback", model=args.model)
                if args.to:
                    cmd["to_version"] = args.to
            else:
                cmd = command(args.op)
            console.send(cmd)
            final = wait_for_final(console, cmd["id"], args.timeout)
    finally:
        console.close()
    if final is None:
        print(f"no final reply from {args.device} within {args.timeout:g}s", file=sys.stderr)
        return EXIT_NO_ANSWER
    print(json.dumps(final))
    if final["status"] == "failed":
        print(f"failed: {final['code']}: {final.get('message', '')}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_DONE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="localhost:1883", help="host[:port]")
    parser.add_argument("--prefix", default="edge", help="topic prefix (mqtt.topic_prefix)")
    parser.add_argument("--device", required=True, help="device id")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    ops = parser.add_subparsers(dest="op", required=True)
    ops.add_parser("ping", help="ask the device to answer at once")
    ops.add_parser("status", help="the device's state and telemetry of now")
    dep = ops.add_parser("deploy", help="deploy a bundle directory")
    dep.add_argument("bundle", help="directory with manifest.json, manifest.sig, the model")
    how = dep.add_mutually_exclusive_group(required=True)
    how.add_argument("--url", help="the device fetches the model file from this URL")
    how.add_argument("--serve", metavar="HOST[:PORT]", help="serve the file over HTTP here")
    how.add_argument("--chunks", action="store_true", help="send the file over MQTT")
    dep.add_argument("--chunk-size", type=int, default=64 * 1024, help="bytes (65536)")
    dep.add_argument("--no-shadow", action="store_true", help="skip shadow evaluation")
    rb = ops.add_parser("rollback", help="go back to the previous (or named) version")
    rb.add_argument("model", help="model name")
    rb.add_argument("--to", help="version to go back to (default: the previous)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
