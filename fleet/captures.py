"""``edge-fleet captures fetch``: a device's frames worth labelling (``pipelines[].capture``)
downloaded from its local HTTP API, each with its sidecar, and deleted there on request.

Speaks HTTP and JSON only. Nothing the device sends names a local file before it is
checked: a pipeline name as the protocol allows it, a file name as the agent writes it.
Each file is written under a temp name and renamed once complete and verified (the
listed size and sha256; the sidecar must name the same file and hash), so the output
directory never holds half a capture; one already there and intact is skipped. With
``--delete``, a capture is deleted on the device only once both its files are verified
here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol import validate_name

from .rollout import EXIT_ERROR, EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)

# As the agent names them: <capture ms>-<frame seq>.<jpg|npy|json>.
FILE_RE = re.compile(r"^(?P<stem>[0-9]{13}-[0-9]{1,20})\.(?P<ext>jpg|npy)$")
# The largest file a device may send for one capture (an uncompressed 4K frame is 25 MB).
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LISTING_BYTES = 64 * 1024 * 1024


class FetchError(Exception):
    """The device could not be asked, or answered something unusable; ``status`` is
    the HTTP status of a refusal (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Listed:
    pipeline: str
    file: str
    sidecar: str
    sha256: str
    bytes: int


@dataclass
class FetchReport:
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: Listed, then replaced on the device by a less confident frame before the download.
    gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fetched": self.fetched,
            "skipped": self.skipped,
            "deleted": self.deleted,
            "gone": self.gone,
            "failed": self.failed,
        }


class DeviceApi:
    """The captures part of an agent's local HTTP API."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"device URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, limit: int) -> bytes:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data: bytes = response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail)["error"]
            raise FetchError(f"{method} {path}: HTTP {exc.code}: {detail}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"{method} {path}: cannot reach {self.url}: {reason}") from None
        if len(data) > limit:
            raise FetchError(f"{method} {path}: more than {limit} bytes")
        return data

    def listing(self) -> list[Listed]:
        try:
            body = json.loads(self._call("GET", "/captures", MAX_LISTING_BYTES))
            rows = body["captures"]
            if not isinstance(rows, list):
                raise TypeError
            return [_listed(row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"GET /captures: not a capture listing: {exc}") from None

    def get(self, pipeline: str, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
        return self._call("GET", f"/captures/{pipeline}/{name}", limit)

    def delete(self, pipeline: str, name: str) -> None:
        self._call("DELETE", f"/captures/{pipeline}/{name}", MAX_LISTING_BYTES)


def _listed(row: Any) -> Listed:
    """One listing row, its names checked before they can name a local file."""
    pipeline, name, sha, size = row["pipeline"], row["file"], row["sha256"], row["bytes"]
    validate_name(pipeline)
    match = FILE_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"bad capture file name {str(name)[:80]!r}")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ValueError(f"bad sha256 for {name}")
    if not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        raise ValueError(f"bad size for {name}")
    return Listed(pipeline, name, f"{match['stem']}.json", sha, size)


def _sidecar_fits(data: bytes, item: Listed) -> bool:
    try:
        body = json.loads(data)
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("file") == item.file
        and (body.get("sha256") == item.sha256)
    )


def _intact(folder: Path, item: Listed) -> bool:
    """Both files already here, and the ones listed."""
    try:
        image = (folder / item.file).read_bytes()
        sidecar = (folder / item.sidecar).read_bytes()
    except OSError:
        return False
    return hashlib.sha256(image).hexdigest() == item.sha256 and _sidecar_fits(sidecar, item)


def _save(folder: Path, name: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # as a plain write would make it, not mkstemp's 0600
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def _fetch_one(api: DeviceApi, out: Path, item: Listed) -> bool:
    """Download one capture into ``out/<pipeline>/``; False when it was there already."""
    folder = out / item.pipeline
    folder.mkdir(parents=True, exist_ok=True)
    if _intact(folder, item):
        return False
    image = api.get(item.pipeline, item.file, item.bytes)
    if len(image) != item.bytes or hashlib.sha256(image).hexdigest() != item.sha256:
        raise FetchError(f"{item.file}: the download does not match the listed size and sha256")
    sidecar = api.get(item.pipeline, item.sidecar)
    if not _sidecar_fits(sidecar, item):
        raise FetchError(f"{item.sidecar}: not the sidecar of {item.file}")
    # The image first: a sidecar here always has its image beside it.
    mode = 0o666 & ~_umask()
    _save(folder, item.file, image, mode)
    _save(folder, item.sidecar, sidecar, mode)
    return True


def fetch_captures(api: DeviceApi, out: Path, *, delete: bool = False) -> FetchReport:
    """Every capture the device lists, into ``out``; raises FetchError when the listing
    cannot be had; a capture that fails is reported and the others go on."""
    report = FetchReport()
    for item in api.listing():
        key = f"{item.pipeline}/{item.file}"
        try:
            fetched = _fetch_one(api, out, item)
            (report.fetched if fetched else report.skipped).append(key)
            log.info("%s %s", "fetched" if fetched else "already here:", key)
            if delete:
                api.delete(item.pipeline, item.file)
                report.deleted.append(key)
        except FetchError as exc:
            if exc.status == 404:
                report.gone.append(key)
                log.info("gone from the device since the listing: %s", key)
            else:
                report.failed[key] = str(exc)
                log.warning("%s: %s", key, exc)
        except OSError as exc:
            report.failed[key] = str(exc)
            log.warning("%s: %s", key, exc)
    return report


# ----------------------------------------------------------------------- command line


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("captures", help="frames a device kept for labelling")
    actions = p.add_subparsers(dest="captures_command", required=True)
    f = actions.add_parser(
        "fetch",
        parents=parents,
        help="download every capture with its sidecar from a device's local API",
    )
    f.add_argument(
        "--url", required=True, metavar="URL", help="the device's local API, http://DEVICE:PORT"
    )
    f.add_argument(
        "-o", "--out", required=True, type=Path, metavar="DIR", help="into DIR/<pipeline>/"
    )
    f.add_argument(
        "--delete", action="store_true", help="delete each from the device once verified here"
    )
    f.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per request")


def run(args: argparse.Namespace) -> int:
    try:
        api = DeviceApi(args.url, args.timeout)
    except ValueError as exc:
        print(f"edge-fleet captures: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = fetch_captures(api, args.out, delete=args.delete)
    except (FetchError, OSError) as exc:
        print(f"edge-fleet captures: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"{len(report.fetched)} fetched, {len(report.skipped)} already in {args.out}, "
            f"{len(report.deleted)} deleted on the device, {len(report.gone)} gone since "
            f"listed, {len(report.failed)} failed"
        )
        for key, why in report.failed.items():
            print(f"  failed: {key}: {why}")
    return EXIT_ERROR if report.failed else EXIT_OK
