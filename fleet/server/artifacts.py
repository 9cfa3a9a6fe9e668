"""The server's artifact store: verified bundles in a directory, one per model file sha256.

Layout: ``<dir>/<sha256>/`` holds ``model.tflite``, ``manifest.json`` and
``manifest.sig`` exactly as uploaded; ``<dir>/.incoming/`` holds uploads being
checked. A bundle enters the store only whole and verified (its manifest parsed by
the agent's one parser, the signature checked against the fleet's keys, the model
file's size and sha256 against the manifest): it is checked in ``.incoming`` and
renamed into place, so a crash leaves either nothing or a complete bundle. Content
addressing makes the paths devices download from unguessable and immutable.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.models.manifest import (
    MODEL_FILE,
    Bundle,
    BundleError,
    fsync_dir,
    read_bundle,
    verify_bundle,
    verify_signature,
)

log = logging.getLogger(__name__)

SHA256_HEX = frozenset("0123456789abcdef")
# An upload nothing was written to for this long is a crash's leftover. Younger ones
# are kept: on a directory shared by several server processes, another's upload may
# be under way.
STALE_UPLOAD_S = 3600.0


class ArtifactError(Exception):
    """An upload that cannot be stored; one line naming the cause."""


class ArtifactStore:
    """Verified bundles on disk, addressed by their model file's sha256."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self.clock = clock

    def open(self) -> None:
        """Create the directory and remove uploads a crash left half checked."""
        incoming = self.dir / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        for upload in incoming.iterdir():
            try:
                changed = max(p.stat().st_mtime for p in (upload, *upload.iterdir()))
            except OSError:  # finished (or removed) by another process meanwhile
                continue
            if self.clock() - changed > STALE_UPLOAD_S:
                log.info("removing the stale upload %s", upload.name)
                shutil.rmtree(upload, ignore_errors=True)

    def incoming(self) -> Path:
        """A new empty directory to write an upload into, before ``add``."""
        return Path(tempfile.mkdtemp(prefix="up-", dir=self.dir / ".incoming"))

    def add(
        self,
        upload: Path,
        keys: Iterable[Ed25519PublicKey],
        *,
        require_signature: bool = True,
    ) -> tuple[Bundle, str | None]:
        """Verify the bundle in ``upload`` (from ``incoming``) and move it into the store.

        Returns the stored bundle and the id of the key that verified it (None when
        unsigned and allowed). ``upload`` is gone afterwards, stored or not.
        """
        keys = list(keys)
        try:
            try:
                bundle = verify_bundle(upload, keys, require_signature=require_signature)
                signer = (
                    verify_signature(bundle.manifest_data, bundle.signature, keys)
                    if bundle.signature is not None and keys
                    else None
                )
            except BundleError as exc:
                raise ArtifactError(str(exc)) from None
            sha = bundle.manifest.model.sha256
            dest = self.bundle_dir(sha)
            if not dest.exists():
                for f in upload.iterdir():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
                try:
                    os.replace(upload, dest)
                except OSError:
                    if not dest.is_dir():
                        raise
                    # Stored meanwhile by another server process sharing the directory.
                else:
                    fsync_dir(self.dir)
            return read_bundle(dest), signer
        finally:
            shutil.rmtree(upload, ignore_errors=True)

    def bundle_dir(self, sha256: str) -> Path:
        if len(sha256) != 64 or not SHA256_HEX.issuperset(sha256):
            raise ArtifactError(f"not a sha256: {sha256[:80]!r}")
        return self.dir / sha256

    def model_path(self, sha256: str) -> Path:
        return self.bundle_dir(sha256) / MODEL_FILE

    def has(self, sha256: str) -> bool:
        try:
            return self.model_path(sha256).is_file()
        except ArtifactError:
            return False
