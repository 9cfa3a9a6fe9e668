"""A local HTTP API in TensorFlow Serving's REST shape, bound to localhost, off by default.

- ``GET /healthz``: 200 when every pipeline is healthy, 503 otherwise, with details.
- ``GET /v1/models/<name>``: the model's status and version.
- ``POST /v1/models/<name>:predict`` with ``{"instances": [...]}``: ``{"predictions": [...]}``.
- ``GET /metrics``: the telemetry figures in Prometheus' text format (``http.metrics``).
- ``GET /captures``: the frames kept for labelling (``pipelines[].capture``), as JSON;
  ``GET /captures/<pipeline>/<file>`` one image or sidecar; ``DELETE`` of either
  removes the pair (labelled, done with). Names are checked strictly (no traversal).

Predictions run on an interpreter of the API's own, loaded from the active version's
file, so the inference loops are never disturbed: their workers keep sole ownership
of their interpreters. Values are real numbers: a quantised input is quantised here
and a quantised output dequantised, so callers need not know the model is int8.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.models.runtime import LoadedModel

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024


class ModelCatalog(Protocol):
    def active(self, name: str) -> tuple[str, Path] | None:
        """(version, model file) of the model's active version, or None."""
        ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the agent is healthy, and the details to show."""
        ...


class MetricsSource(Protocol):
    def render(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape; raises RuntimeError when it cannot."""
        ...


class CaptureFiles(Protocol):
    """The kept frames: names are the capture module's to check (ValueError: a bad
    name; LookupError: not kept)."""

    def listing(self) -> list[dict[str, Any]]: ...

    def path(self, pipeline: str, name: str) -> Path: ...

    def delete(self, pipeline: str, name: str) -> list[str]: ...


_CONTENT_TYPES = {".jpg": "image/jpeg", ".json": "application/json"}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Entry:
    version: str
    model: LoadedModel
    lock: threading.Lock


class Predictor:
    """One API interpreter per model name, rebuilt when the active version changes."""

    def __init__(self, catalog: ModelCatalog, load: Callable[[Path], LoadedModel]) -> None:
        self.catalog = catalog
        self.load = load
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def status(self, name: str) -> dict[str, Any]:
        active = self.catalog.active(name)
        if active is None:
            raise ApiError(404, f"model {name!r} has no active version on this device")
        return {
            "model_version_status": [
                {"version": active[0], "state": "AVAILABLE", "status": {"error_code": "OK"}}
            ]
        }

    def _entry(self, name: str) -> _Entry:
        active = self.catalog.active(name)
        if active is None:
            raise ApiError(404, f"model {name!r} has no active version on this device")
        version, path = active
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.version != version:
                entry = _Entry(version, self.load(path), threading.Lock())
                self._entries[name] = entry
            return entry

    def predict(self, name: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or "instances" not in body:
            raise ApiError(400, 'request body must be a JSON object with "instances"')
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ApiError(400, '"instances" must be a non-empty list')
        entry = self._entry(name)
        model = entry.model
        if len(model.inputs) != 1:
            raise ApiError(400, "the predict API supports single-input models only")
        inp = model.inputs[0]
        predictions = []
        with entry.lock:
            for i, instance in enumerate(instances):
                try:
                    x = np.asarray(instance, dtype=np.float32).reshape(inp.shape)
                except (ValueError, TypeError):
                    raise ApiError(
                        400,
                        f"instances[{i}] does not fit input shape {list(inp.shape[1:])}",
                    ) from None
                if not np.isfinite(x).all():
                    raise ApiError(400, f"instances[{i}] holds NaN or infinity")
                model.interpreter.set_tensor(inp.index, inp.quantize(x))
                model.interpreter.invoke()
                outs = [o.dequantize(model.interpreter.get_tensor(o.index)) for o in model.outputs]
                predictions.append(
                    outs[0][0].tolist() if len(outs) == 1 else [o[0].tolist() for o in outs]
                )
        return {"predictions": predictions, "model_version": entry.version}


class _Handler(BaseHTTPRequestHandler):
    server: _ApiServer

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are not news: keep them out of the journal unless debugging.
        logger.debug("http %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> tuple[int, dict[str, Any]]:
        path = self.path.split("?", 1)[0]
        if method == "GET" and path == "/healthz":
            ok, details = self.server.predictor.catalog.health()
            return (200 if ok else 503), {"ok": ok, **details}
        if not path.startswith("/v1/models/"):
            raise ApiError(404, f"no such endpoint: {path}")
        rest = path[len("/v1/models/") :]
        if method == "GET" and ":" not in rest and "/" not in rest:
            return 200, self.server.predictor.status(rest)
        if method == "POST" and rest.endswith(":predict"):
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                raise ApiError(400 if length <= 0 else 413, f"body must be 1..{MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError as exc:
                raise ApiError(400, f"body is not valid JSON: {exc}") from None
            return 200, self.server.predictor.predict(rest[: -len(":predict")], body)
        raise ApiError(405, f"{method} {path} not supported")

    def _metrics(self) -> tuple[bytes, str]:
        metrics = self.server.metrics
        if metrics is None:
            raise ApiError(404, "metrics are off (http.metrics: false)")
        try:
            return metrics.render()
        except RuntimeError as exc:
            raise ApiError(503, str(exc)) from None

    def _captures(self, method: str, path: str) -> tuple[int, dict[str, Any]] | None:
        """Lists or deletes captures; serves a file itself (then None)."""
        captures = self.server.captures
        if captures is None:
            raise ApiError(404, "captures are not served by this API")
        if path == "/captures":
            if method != "GET":
                raise ApiError(405, f"{method} {path} not supported")
            return 200, {"captures": captures.listing()}
        parts = path[len("/captures/") :].split("/")
        if len(parts) != 2:
            raise ApiError(400, "expected /captures/<pipeline>/<file>")
        try:
            if method == "DELETE":
                return 200, {"deleted": captures.delete(*parts)}
            if method != "GET":
                raise ApiError(405, f"{method} {path} not supported")
            self._send_file(captures.path(*parts))
            return None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except LookupError as exc:
            raise ApiError(404, str(exc)) from None

    def _send_file(self, path: Path) -> None:
        try:
            f = path.open("rb")
        except FileNotFoundError:  # removed since it was looked up (a newer frame won)
            raise LookupError(f"no capture {path.name!r}") from None
        with f:
            self.send_response(200)
            kind = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            try:
                shutil.copyfileobj(f, self.wfile)
            except OSError as exc:  # the headers are out: a short body tells the client
                logger.debug("http api: sending %s cut short: %s", path.name, exc)

    def _handle(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0]
            if method == "GET" and path == "/metrics":
                self._send_bytes(200, *self._metrics())
                return
            if path == "/captures" or path.startswith("/captures/"):
                answer = self._captures(method, path)
                if answer is None:
                    return
                status, body = answer
            else:
                status, body = self._route(method)
        except ApiError as exc:
            status, body = exc.status, {"error": str(exc)}
        except Exception as exc:  # a bug answers 500; the server thread lives on
            logger.exception("http api: %s %s failed", method, self.path)
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        self._send(status, body)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        predictor: Predictor,
        metrics: MetricsSource | None,
        captures: CaptureFiles | None,
    ) -> None:
        super().__init__(address, _Handler)
        self.predictor = predictor
        self.metrics = metrics
        self.captures = captures
        self.heartbeat = time.monotonic()

    def service_actions(self) -> None:
        # Called by serve_forever on every poll turn: the supervisor's heartbeat.
        self.heartbeat = time.monotonic()


class HttpApi:
    """The server and its thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        bind: str,
        port: int,
        predictor: Predictor,
        metrics: MetricsSource | None = None,
        captures: CaptureFiles | None = None,
    ) -> None:
        self._server = _ApiServer((bind, port), predictor, metrics, captures)
        self.port = int(self._server.server_address[1])
        self._stopping = False
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-api",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def thread(self) -> threading.Thread | None:
        """The server thread while it should be running (for the supervisor)."""
        return None if self._stopping else self._thread

    def heartbeat(self) -> float:
        return self._server.heartbeat

    def restart_thread(self) -> None:
        """Serve again on a fresh thread after the last one died (the socket stays open)."""
        if not self._stopping:
            self._server.heartbeat = time.monotonic()
            self._thread = self._new_thread()
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever's next poll turn (0.2 s)
        self._server.server_close()
        self._thread.join(timeout)
