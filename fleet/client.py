"""A client of the fleet server's HTTP API, over urllib (no dependency of its own).

Every failure is one ``ServerError`` line: the HTTP status and the server's
``detail``, or what kept the request from reaching the server.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.models.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE

# Form field -> bundle file, as the server's upload expects them.
BUNDLE_FIELDS = (("manifest", MANIFEST_FILE), ("signature", SIGNATURE_FILE), ("model", MODEL_FILE))
CHUNK = 1 << 20


class ServerError(Exception):
    """A request that failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerClient:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server URL {url!r}: expected http://HOST:PORT or https://...")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # ---------------------------------------------------------------- inventory

    def devices(self, **filters: Any) -> dict[str, Any]:
        """One page of ``GET /api/devices`` (group, model, version, status, online, q,
        sort, limit, offset)."""
        return self._json("GET", "/api/devices", query=filters)

    def all_devices(self, **filters: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            page = self.devices(**filters, offset=len(rows), limit=1000)
            rows.extend(page["devices"])
            if not page["devices"] or len(rows) >= page["total"]:
                return rows

    def device(self, device: str) -> dict[str, Any]:
        return self._json("GET", f"/api/devices/{_seg(device)}")

    def history(self, device: str, limit: int = 50) -> dict[str, Any]:
        return self._json("GET", f"/api/devices/{_seg(device)}/history", query={"limit": limit})

    def telemetry(self, device: str, **query: Any) -> dict[str, Any]:
        """One device's telemetry series (since, until, pipeline, step)."""
        return self._json("GET", f"/api/devices/{_seg(device)}/telemetry", query=query)

    def groups(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/groups")

    # ------------------------------------------------------------------ bundles

    def upload_bundle(self, directory: Path) -> dict[str, Any]:
        """Upload a bundle directory (idempotent for the same name, version and file)."""
        parts = [(f, directory / n) for f, n in BUNDLE_FIELDS if (directory / n).exists()]
        return self._upload("/api/bundles", MultipartBody(f"edge-fleet-{uuid.uuid4().hex}", parts))

    def bundle(self, name: str, version: str) -> dict[str, Any]:
        return self._json("GET", f"/api/bundles/{_seg(name)}/{_seg(version)}")

    # ----------------------------------------------------------------- rollouts

    def create_rollout(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/rollouts", body=body)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/rollouts/{_seg(rollout_id)}")

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """approve, pause, resume or abort."""
        return self._json("POST", f"/api/rollouts/{_seg(rollout_id)}/{_seg(action)}")

    def rollouts(self, **filters: Any) -> Any:
        return self._json("GET", "/api/rollouts", query=filters)

    # ----------------------------------------------------------------- commands

    def send_command(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/commands", body=body)

    def commands(self, ids: list[str]) -> list[dict[str, Any]]:
        return self._json("GET", "/api/commands", query={"id": ids, "limit": 1000})

    def command(self, command_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/commands/{_seg(command_id)}")

    def remove_desired(
        self, model: str, *, group: str | None = None, device: str | None = None
    ) -> dict[str, Any]:
        """Drop a declaration of ``model`` for a group or a device (a pin)."""
        target = {"group": group} if group is not None else {"device": device}
        return dict(self._json("DELETE", "/api/desired", query={"model": model, **target}))

    # ------------------------------------------------------------------ request

    def _json(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        url = self.url + path
        if query:
            pairs = {k: _query_value(v) for k, v in query.items() if v is not None}
            url += "?" + urllib.parse.urlencode(pairs, doseq=True)
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _refused(method, path, exc.code, exc.reason, _read(exc)) from None
        except urllib.error.URLError as exc:
            raise ServerError(
                f"cannot reach the server at {self.url}: {_reason(exc.reason)}"
            ) from None
        except TimeoutError:
            raise self._timeout(method, path) from None
        except OSError as exc:
            raise ServerError(f"{method} {path} to {self.url} failed: {exc}") from None
        return _decode(method, path, raw)

    def _upload(self, path: str, body: MultipartBody) -> Any:
        """POST a multipart body from files, and read the answer even when the server
        gives it before the body is sent (a refusal of an upload over its size limit):
        urllib reports only the broken pipe then, so this uses http.client beneath it."""
        parsed = urllib.parse.urlsplit(self.url)
        kind = (
            http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(parsed.netloc, timeout=self.timeout)
        try:
            try:
                conn.putrequest("POST", parsed.path + path)
                headers = {
                    "Accept": "application/json",
                    "Content-Type": f"multipart/form-data; boundary={body.boundary}",
                    "Content-Length": str(len(body)),
                }
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
            except OSError as exc:
                raise ServerError(
                    f"cannot reach the server at {self.url}: {_reason(exc)}"
                ) from None
            try:
                for chunk in body:
                    conn.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early; its answer says why
            try:
                response = conn.getresponse()
                raw = response.read()
            except TimeoutError:
                raise self._timeout("POST", path) from None
            except (OSError, http.client.HTTPException) as exc:
                raise ServerError(
                    f"POST {path}: the server closed the connection during the upload ({exc})"
                ) from None
        finally:
            conn.close()
        if response.status >= 400:
            raise _refused("POST", path, response.status, response.reason, raw)
        return _decode("POST", path, raw)

    def _timeout(self, method: str, path: str) -> ServerError:
        return ServerError(
            f"the server at {self.url} did not answer {method} {path} within {self.timeout:g}s"
        )


class MultipartBody:
    """A multipart/form-data body read from files as it is sent, with its length known
    up front (so the server can refuse an upload over its limit before it is read)."""

    def __init__(self, boundary: str, parts: list[tuple[str, Path]]) -> None:
        self.boundary = boundary
        self.parts = parts

    def _head(self, field: str, path: Path) -> bytes:
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        total = len(self._tail())
        for field, path in self.parts:
            total += len(self._head(field, path)) + os.path.getsize(path) + 2
        return total

    def __iter__(self) -> Iterator[bytes]:
        for field, path in self.parts:
            yield self._head(field, path)
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._tail()


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _query_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _read(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except OSError:
        return b""


def _decode(method: str, path: str, raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ServerError(f"{method} {path}: the server's answer is not JSON") from None


def _refused(method: str, path: str, status: int, reason: str, raw: bytes) -> ServerError:
    """``GET /api/x: HTTP 404 Not Found: <the server's detail>``."""
    detail = ""
    try:
        payload = json.loads(raw or b"null")
        if isinstance(payload, dict):
            detail = str(payload.get("detail") or "")
    except ValueError:
        pass
    text = f"{method} {path}: HTTP {status} {reason}"
    return ServerError(f"{text}: {' '.join(detail.split())}" if detail else text, status)


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is `edge-fleet server` running there?)"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason})"
    return str(reason)
