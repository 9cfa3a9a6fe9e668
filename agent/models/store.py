"""The on-device model store: verified versions on disk, active and last-known-good.

Layout under the state directory::

    models/<name>/<version>/{model.tflite, manifest.json, manifest.sig}
    models/state.json          active, last-known-good, previous and install order per model
    models/.incoming/          temp dirs of installs in progress (same filesystem)

An install is built in ``.incoming``, fsynced, checked (size, sha256, Ed25519 signature)
and only then renamed into place, so a crash or a bad file never leaves a half-written
version where the agent would look for one. Leftovers of a crash are removed when the
store is opened. The state file is replaced atomically (write temp, fsync, rename), and
before the version's rename: a crash between the two leaves a state naming a version
that is not there, which reading the state forgets. A removal renames the version away
first. So at every instant the state file parses and every version it lists is whole.

The state records, per model, the version on trial (installed by a deploy, not yet
through probation) and the versions that failed probation; see ``ModelRecord``.

The store owns these files: everything else asks it. Its methods are thread-safe.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.models.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    BundleError,
    ChecksumError,
    Manifest,
    ManifestError,
    SignatureError,
    check_model_file,
    fsync_dir,
    load_manifest_data,
    parse_manifest,
    verify_signature,
)
from agent.protocol import SAFE_ID_RE, ReplyCode

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
INCOMING_DIR = ".incoming"
_COPY_CHUNK = 1 << 20
_SAFE = SAFE_ID_RE
_NOTE_KEYS = ("version", "code", "message", "rolled_back_to")
_NOTE_MAX = 500

# Writes ``data`` to the file descriptor and returns the bytes written, like os.write.
# The store's one seam to the disk for writes, so a test can fill the disk (ENOSPC).
WriteFn = Callable[[int, bytes], int]


class StoreError(Exception):
    """An install or lookup the store refuses; ``code`` is the reply code to answer with."""

    def __init__(self, code: ReplyCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


@dataclass
class ModelRecord:
    """What the state file remembers of one model.

    ``trial`` names the version a deploy is bringing in and that has not passed
    probation yet. While it is not ``active`` the deploy had not reached the swap;
    once it is ``active`` it serves on trial. Either way a restart must not trust it
    (see ``ModelLifecycle.start``). ``failed`` lists the stored versions that failed
    probation (a restart during probation counts), which nothing picks by itself
    again; ``failure`` is the last such outcome, kept for the command plane's reply.
    """

    active: str | None = None
    last_known_good: str | None = None
    previous: str | None = None
    installed: list[str] = field(default_factory=list)  # install order, oldest first
    trial: str | None = None
    failed: list[str] = field(default_factory=list)
    failure: dict[str, str] | None = None

    def copy(self) -> ModelRecord:
        return ModelRecord(
            self.active,
            self.last_known_good,
            self.previous,
            list(self.installed),
            self.trial,
            list(self.failed),
            dict(self.failure) if self.failure is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "last_known_good": self.last_known_good,
            "previous": self.previous,
            "installed": list(self.installed),
            "trial": self.trial,
            "failed": list(self.failed),
            "failure": dict(self.failure) if self.failure is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelRecord:
        """Reads every state file the agent ever wrote (older ones lack the trial keys)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and _SAFE.match(value) else None

        def versions(key: str) -> list[str]:
            value = data.get(key)
            if not isinstance(value, list):
                return []
            return [v for v in value if isinstance(v, str) and _SAFE.match(v)]

        failure = data.get("failure")
        return cls(
            active=text("active"),
            last_known_good=text("last_known_good"),
            previous=text("previous"),
            installed=versions("installed"),
            trial=text("trial"),
            failed=versions("failed"),
            failure={
                k: v[:_NOTE_MAX]
                for k, v in failure.items()
                if k in _NOTE_KEYS and isinstance(v, str)
            }
            if isinstance(failure, dict)
            else None,
        )


def check_component(value: object, what: str) -> str:
    """A model name or version that is safe as one directory name."""
    if not isinstance(value, str) or not _SAFE.match(value) or value in (".", ".."):
        raise StoreError(
            ReplyCode.BAD_MANIFEST,
            f"{what} {value!r} may hold only letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit",
        )
    return value


class ModelStore:
    """Model versions under ``<state_dir>/models``; see the module docstring.

    Two locks: ``_lock`` guards the in-memory records and is never held across disk
    I/O, so a reader (``record``, ``names``; the MQTT thread asks for model states)
    never waits on the disk. ``_writer`` serialises the changes; a change copies,
    hashes and fsyncs with only ``_writer`` held, writes the new state file, and only
    then publishes the new records under ``_lock``. Readers see the old records until
    the new ones are durable.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        trusted_keys: Iterable[Ed25519PublicKey] = (),
        require_signature: bool = True,
        keep_versions: int = 3,
        write: WriteFn = os.write,
    ) -> None:
        self.root = Path(state_dir) / "models"
        self._keys = list(trusted_keys)
        self._require_signature = require_signature
        self._keep = max(1, keep_versions)
        self._write = write
        self._lock = threading.Lock()
        self._writer = threading.RLock()
        self._records: dict[str, ModelRecord] | None = None

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        """Create the directories, drop leftovers of interrupted installs, read the state."""
        with self._writer:
            self.root.mkdir(parents=True, exist_ok=True)
            incoming = self.root / INCOMING_DIR
            if incoming.exists():
                shutil.rmtree(incoming, ignore_errors=True)
            for stale in self.root.glob(f".{STATE_FILE}.*.tmp"):
                stale.unlink(missing_ok=True)
            records = self._read_state()
            with self._lock:
                self._records = records

    def _read_state(self) -> dict[str, ModelRecord]:
        path = self.root / STATE_FILE
        records: dict[str, ModelRecord] = {}
        try:
            data = json.loads(path.read_bytes())
            models = data.get("models", {}) if isinstance(data, dict) else {}
            for name, rec in models.items():
                if isinstance(name, str) and _SAFE.match(name) and isinstance(rec, dict):
                    records[name] = ModelRecord.from_json(rec)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            # The versions on disk are still there; recovery picks one of them.
            logger.warning("model state file %s unreadable (%s); starting afresh", path, exc)
        # Versions found on disk but missing from the install order go first (oldest).
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if model_dir.name.startswith(".") or not _SAFE.match(model_dir.name):
                continue
            rec = records.setdefault(model_dir.name, ModelRecord())
            on_disk = sorted(
                (d for d in model_dir.iterdir() if d.is_dir() and _SAFE.match(d.name)),
                key=lambda d: d.stat().st_mtime,
            )
            known = set(rec.installed)
            rec.installed = [d.name for d in on_disk if d.name not in known] + [
                v for v in rec.installed if (model_dir / v).is_dir()
            ]
        # The state file is written before a version is renamed into place, so it may
        # name a version whose directory never arrived: forget such names.
        for rec in records.values():
            stored = set(rec.installed)
            for key in ("active", "last_known_good", "previous", "trial"):
                if getattr(rec, key) not in stored:
                    setattr(rec, key, None)
            rec.failed = [v for v in rec.failed if v in stored]
        return records

    def peek_records(self) -> dict[str, ModelRecord]:
        """What the state file and the disk hold, without opening the store.

        Unlike ``open()`` this removes no leftovers and creates nothing, so a
        diagnostic may read it while the agent is installing a version.
        """
        return self._read_state() if self.root.is_dir() else {}

    def _snapshot(self) -> dict[str, ModelRecord]:
        """A private copy of the records to change (opening the store on first use)."""
        return self.records

    # ------------------------------------------------------------------ queries

    def _current(self) -> dict[str, ModelRecord]:
        with self._lock:
            records = self._records
        if records is None:
            self.open()
            with self._lock:
                records = self._records
        assert records is not None
        return records

    @property
    def records(self) -> dict[str, ModelRecord]:
        """A copy of every record."""
        current = self._current()
        with self._lock:
            return {n: r.copy() for n, r in current.items()}

    def names(self) -> list[str]:
        current = self._current()
        with self._lock:
            return sorted(n for n, r in current.items() if r.installed or r.active)

    def record(self, name: str) -> ModelRecord:
        """A copy of what the store knows of ``name`` (empty when unknown)."""
        current = self._current()
        with self._lock:
            return current.get(name, ModelRecord()).copy()

    def versions(self, name: str) -> list[str]:
        """Installed versions, oldest first."""
        return self.record(name).installed

    def get(self, name: str, version: str, *, verify: bool = False) -> StoredVersion:
        """An installed version; with ``verify`` its model file is re-hashed against the manifest.

        Raises ``StoreError`` (not_found, bad_manifest, checksum_mismatch).
        """
        check_component(name, "model name")
        check_component(version, "version")
        path = self.root / name / version
        if not path.is_dir():
            raise StoreError(ReplyCode.NOT_FOUND, f"model {name} version {version} is not stored")
        try:
            manifest = parse_manifest(load_manifest_data(path / MANIFEST_FILE))
            if verify:
                check_model_file(path / MODEL_FILE, manifest)
        except ChecksumError as exc:
            raise StoreError(ReplyCode.CHECKSUM_MISMATCH, f"{name} {version}: {exc}") from None
        except BundleError as exc:
            raise StoreError(ReplyCode.BAD_MANIFEST, f"{name} {version}: {exc}") from None
        return StoredVersion(name, version, path, manifest)

    # ------------------------------------------------------------------ install

    def check_manifest(self, data: Mapping[str, Any], signature: str | None) -> Manifest:
        """The parsed manifest, once its names, schema and signature pass; else ``StoreError``."""
        if isinstance(data, Mapping):
            # Named first, with a store-specific reason, before the generic schema errors.
            for key, what in (("name", "model name"), ("version", "version")):
                if key in data:
                    check_component(data[key], what)
        try:
            manifest = parse_manifest(data)
        except ManifestError as exc:
            raise StoreError(ReplyCode.BAD_MANIFEST, str(exc)) from None
        if self._require_signature or (signature is not None and self._keys):
            try:
                verify_signature(data, signature, self._keys)
            except SignatureError as exc:
                raise StoreError(ReplyCode.BAD_SIGNATURE, str(exc)) from None
        return manifest

    def install(
        self,
        manifest_data: Mapping[str, Any],
        signature: str | None,
        model_file: Path,
        *,
        trial: bool = False,
    ) -> StoredVersion:
        """Verify and install one version atomically; ``StoreError`` says why not.

        Installing a version that is already stored with the same sha256 returns it
        unchanged; with other content it is refused (a version names one file forever).
        With ``trial`` a newly installed version is recorded as the model's trial in
        the same state write that lists it (see ``ModelRecord``).

        The copy, hash and fsyncs happen in ``.incoming`` without the records lock;
        the state file is written before the rename, so at no instant does the state
        name a half version or a finished version lack its state.
        """
        manifest = self.check_manifest(manifest_data, signature)
        name, version = manifest.name, manifest.version
        self._current()  # opened first: opening clears .incoming
        final = self.root / name / version
        existing = self._existing(final, manifest)
        if existing is not None:
            return existing
        self._check_source(model_file, manifest)
        incoming = self.root / INCOMING_DIR
        tmp: Path | None = None
        try:
            incoming.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}-{version}.", dir=incoming))
            size, digest = self._copy(model_file, tmp / MODEL_FILE)
            if size != manifest.model.size or digest != manifest.model.sha256:
                raise StoreError(
                    ReplyCode.CHECKSUM_MISMATCH,
                    f"model file changed while it was installed ({size} bytes, sha256 "
                    f"{digest[:12]}…); manifest says {manifest.model.size} bytes, "
                    f"{manifest.model.sha256[:12]}…",
                )
            body = json.dumps(dict(manifest_data), indent=2, sort_keys=True) + "\n"
            self._write_file(tmp / MANIFEST_FILE, body.encode())
            if signature is not None:
                self._write_file(tmp / SIGNATURE_FILE, signature.strip().encode() + b"\n")
            fsync_dir(tmp)
            with self._writer:
                existing = self._existing(final, manifest)
                if existing is not None:
                    return existing
                final.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)
                records = self._snapshot()
                rec = records.setdefault(name, ModelRecord())
                rec.installed = [v for v in rec.installed if v != version] + [version]
                rec.failed = [v for v in rec.failed if v != version]
                if trial:
                    rec.trial = version
                self._write_state(records)
                os.rename(tmp, final)
                tmp = None
                fsync_dir(final.parent)
                self._publish(records)
        except OSError as exc:
            raise StoreError(
                ReplyCode.STORAGE_FAILED,
                f"cannot install {name} {version}: {exc.strerror or exc}"
                + (" (disk full)" if exc.errno == errno.ENOSPC else ""),
            ) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("installed model %s version %s", name, version)
        return StoredVersion(name, version, final, manifest)

    def _existing(self, final: Path, manifest: Manifest) -> StoredVersion | None:
        if not final.exists():
            return None
        existing = self.get(manifest.name, manifest.version)
        if existing.manifest.model.sha256 != manifest.model.sha256:
            raise StoreError(
                ReplyCode.BAD_MANIFEST,
                f"model {manifest.name} version {manifest.version} is already installed with "
                "other content; give the new model a new version",
            )
        return existing

    @staticmethod
    def _check_source(model_file: Path, manifest: Manifest) -> None:
        try:
            size = model_file.stat().st_size
        except OSError as exc:
            raise StoreError(
                ReplyCode.STORAGE_FAILED, f"model file {model_file}: {exc.strerror or exc}"
            ) from None
        if size != manifest.model.size:
            raise StoreError(
                ReplyCode.CHECKSUM_MISMATCH,
                f"model file is {size} bytes, manifest says {manifest.model.size} (truncated?)",
            )

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._write(fd, bytes(view[:_COPY_CHUNK]))
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view = view[n:]

    def _copy(self, source: Path, dest: Path) -> tuple[int, str]:
        """Copy through the write seam, hashing what is written; fsync before returning."""
        digest = hashlib.sha256()
        size = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with source.open("rb") as src:
                while block := src.read(_COPY_CHUNK):
                    self._write_all(fd, block)
                    digest.update(block)
                    size += len(block)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, digest.hexdigest()

    def _write_file(self, dest: Path, data: bytes) -> None:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ state

    def _write_state(self, records: Mapping[str, ModelRecord]) -> None:
        """Replace the state file atomically (temp, fsync, rename, fsync the directory)."""
        data = {"models": {n: r.to_json() for n, r in sorted(records.items())}}
        body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=self.root)
        tmp = Path(tmp_name)
        try:
            try:
                self._write_all(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.root / STATE_FILE)
            fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _publish(self, records: dict[str, ModelRecord]) -> None:
        with self._lock:
            self._records = records

    def _update(self, name: str, change: Callable[[ModelRecord], None]) -> None:
        """Change one record durably: the readers see it once the state file holds it."""
        with self._writer:
            records = self._snapshot()
            change(records.setdefault(name, ModelRecord()))
            try:
                self._write_state(records)
            except OSError as exc:
                raise StoreError(
                    ReplyCode.STORAGE_FAILED,
                    f"cannot write the model state file: {exc.strerror or exc}",
                ) from None
            self._publish(records)

    def set_active(self, name: str, version: str | None) -> None:
        """Make ``version`` (or nothing) the active one; the old active becomes ``previous``."""

        def change(rec: ModelRecord) -> None:
            if rec.active != version:
                if rec.active is not None:
                    rec.previous = rec.active
                rec.active = version

        if version is not None:
            self.get(name, version)
        self._update(name, change)

    def mark_good(self, name: str, version: str) -> None:
        """Record ``version`` as last-known-good (its trial is over), then prune to K kept."""
        self.get(name, version)

        def change(rec: ModelRecord) -> None:
            rec.last_known_good = version
            rec.failed = [v for v in rec.failed if v != version]
            rec.failure = None  # a version passed since: old news
            if rec.trial == version:
                rec.trial = None

        self._update(name, change)
        self.prune(name)

    def fail_trial(
        self, name: str, version: str, note: Mapping[str, str], *, active: str | None
    ) -> None:
        """One state write: ``version`` failed probation, ``active`` serves instead.

        The failed version stays stored (for a post-mortem) but is never chosen by
        itself again; ``note`` (version, code, message, rolled_back_to) is kept as the
        model's ``failure`` for whoever must report the outcome.
        """
        if active is not None:
            self.get(name, active)

        def change(rec: ModelRecord) -> None:
            if rec.trial == version:
                rec.trial = None
            if version in rec.installed and version not in rec.failed:
                rec.failed.append(version)
            if rec.previous == version:
                rec.previous = None
            if rec.active != active:
                if rec.active not in (None, version):
                    rec.previous = rec.active
                rec.active = active
            rec.failure = {k: str(v)[:_NOTE_MAX] for k, v in note.items() if k in _NOTE_KEYS}

        self._update(name, change)

    def remove(self, name: str, version: str) -> None:
        """Delete a stored version; never the active or last-known-good one."""
        with self._writer:
            rec = self.record(name)
            if version in (rec.active, rec.last_known_good):
                raise StoreError(
                    ReplyCode.INTERNAL,
                    f"refusing to remove {name} {version}: it is active or last-known-good",
                )
            self._remove(name, version)

    def _remove(self, name: str, version: str) -> None:
        path = self.root / check_component(name, "model name") / check_component(version, "version")
        if path.exists():
            # Renamed first so a crash mid-delete never leaves a half version in place.
            incoming = self.root / INCOMING_DIR
            incoming.mkdir(parents=True, exist_ok=True)
            doomed = Path(tempfile.mkdtemp(prefix=f"rm-{name}-{version}.", dir=incoming))
            os.replace(path, doomed / "v")
            shutil.rmtree(doomed, ignore_errors=True)

        def change(rec: ModelRecord) -> None:
            rec.installed = [v for v in rec.installed if v != version]
            rec.failed = [v for v in rec.failed if v != version]
            if rec.previous == version:
                rec.previous = None
            if rec.trial == version:
                rec.trial = None

        self._update(name, change)
        logger.info("removed model %s version %s", name, version)

    def prune(self, name: str) -> list[str]:
        """Keep the newest K versions plus active and last-known-good; returns those removed."""
        with self._writer:
            rec = self.record(name)
            if not rec.installed:
                return []
            protected = {rec.active, rec.last_known_good, rec.trial}
            keep = set(rec.installed[-self._keep :]) | protected
            doomed = [v for v in rec.installed if v not in keep]
            for version in doomed:
                self._remove(name, version)
            return doomed
