"""Receiving a bundle upload: a multipart body streamed to files, counting bytes.

Starlette's form parser would spool the whole body before the handler could look
at it; this reads the request stream itself, so an upload over the limit is
refused when its ``Content-Length`` says so, or at the first byte past the limit,
with nothing kept. Untrusted bytes go to disk only under known names: each field
maps to one bundle file, and anything else is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from agent.models.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE

# Form field -> file of the bundle directory.
FIELDS = {"manifest": MANIFEST_FILE, "signature": SIGNATURE_FILE, "model": MODEL_FILE}
REQUIRED = ("manifest", "model")


class UploadError(Exception):
    """An upload refused before it is read whole; ``status`` is the HTTP answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Writer:
    """The parser's callbacks: headers of a part name its file; data goes straight in."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[str] = set()
        self._header = b""
        self._value = b""
        self._disposition = b""
        self._file: BinaryIO | None = None

    def on_part_begin(self) -> None:
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if name not in FIELDS:
            known = ", ".join(FIELDS)
            raise UploadError(400, f"unknown form field {name[:40]!r}: expected {known}")
        if name in self.seen:
            raise UploadError(400, f"form field {name!r} given twice")
        self.seen.add(name)
        self._file = (self.directory / FIELDS[name]).open("xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(data[start:end])

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.on_part_end()


async def receive_bundle(
    content_type: str,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    directory: Path,
    max_bytes: int,
) -> None:
    """Write the form fields ``manifest``, ``signature`` and ``model`` into ``directory``.

    Raises ``UploadError`` (413 past ``max_bytes``, 400 for a body that is not the
    expected form); the caller removes ``directory`` then.
    """
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(
            415, "expected multipart/form-data with the fields manifest, signature, model"
        )
    limit_mb = max_bytes / (1 << 20)
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(
                400, f"Content-Length {content_length[:20]!r} is not a number"
            ) from None
        if declared > max_bytes:
            raise UploadError(
                413, f"upload of {declared} bytes exceeds http.max_upload_mb ({limit_mb:g})"
            )
    writer = _Writer(directory)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": writer.on_part_begin,
            "on_header_field": writer.on_header_field,
            "on_header_value": writer.on_header_value,
            "on_header_end": writer.on_header_end,
            "on_headers_finished": writer.on_headers_finished,
            "on_part_data": writer.on_part_data,
            "on_part_end": writer.on_part_end,
        },
    )
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, f"upload exceeds http.max_upload_mb ({limit_mb:g})")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    finally:
        writer.close()
    missing = [f for f in REQUIRED if f not in writer.seen]
    if missing:
        raise UploadError(400, f"form field {missing[0]!r} missing ({FIELDS[missing[0]]})")
