"""The artifact store on a directory shared by several server processes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from agent.models.manifest import load_public_key
from fleet.server import artifacts
from fleet.server.artifacts import STALE_UPLOAD_S, ArtifactStore
from tests.fleet_support import make_bundle, make_keys

MODEL = bytes(range(256)) * 8


def test_opening_keeps_uploads_under_way_and_removes_stale_ones(tmp_path: Path) -> None:
    first = ArtifactStore(tmp_path / "shared")
    first.open()
    under_way = first.incoming()  # another process's upload, being written
    (under_way / "model.tflite").write_bytes(b"half")
    stale = first.incoming()  # a crash's leftover
    (stale / "model.tflite").write_bytes(b"half")
    old = time.time() - STALE_UPLOAD_S - 60
    for path in (stale, stale / "model.tflite"):
        os.utime(path, (old, old))

    ArtifactStore(tmp_path / "shared").open()  # a second process starts

    assert (under_way / "model.tflite").read_bytes() == b"half"
    assert not stale.exists()


def test_a_bundle_stored_meanwhile_by_another_process_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "bundle", MODEL, version="2", keys=keys)
    store = ArtifactStore(tmp_path / "shared")
    store.open()
    upload = store.incoming()
    for f in bundle.iterdir():
        shutil.copy(f, upload / f.name)
    replace = os.replace

    def other_process_first(src: Path, dst: Path) -> None:
        shutil.copytree(bundle, dst)  # the same bundle, renamed into place by another
        replace(src, dst)  # now fails: the directory exists and is not empty

    monkeypatch.setattr(artifacts.os, "replace", other_process_first)
    stored, signer = store.add(upload, [load_public_key(keys.public)])

    assert stored.manifest.version == "2" and signer is not None
    assert store.has(stored.manifest.model.sha256)
    assert not upload.exists()
