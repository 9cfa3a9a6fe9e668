from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from agent.models import manifest as mf
from agent.models.store import ModelRecord, ModelStore, StoreError
from agent.protocol import ReplyCode
from tests.lifecycle_support import Keys, make_bundle, make_keys, manifest_for


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


def new_store(tmp_path: Path, keys: Keys, **kwargs: object) -> ModelStore:
    store = ModelStore(tmp_path / "state", trusted_keys=[keys.public], **kwargs)  # type: ignore[arg-type]
    store.open()
    return store


def leftovers(store: ModelStore) -> list[str]:
    """Anything in the store that is not a finished version or the state file."""
    found = []
    for p in store.root.rglob("*"):
        rel = p.relative_to(store.root)
        if rel.parts[0] == ".incoming" and len(rel.parts) > 1:
            found.append(str(rel))
        elif p.name.endswith(".tmp"):
            found.append(str(rel))
    return found


def test_install_is_complete_and_recorded(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    bundle = make_bundle(tmp_path / "b", tiny_int8_model, keys)
    stored = store.install(bundle.manifest_data, bundle.signature, bundle.model_path)
    assert stored.path == tmp_path / "state/models/digits/1"
    assert sorted(p.name for p in stored.path.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.tflite",
    ]
    # What was installed still verifies as a bundle with the trusted key.
    mf.verify_bundle(stored.path, [keys.public])
    assert store.versions("digits") == ["1"]
    assert leftovers(store) == []
    # Installing the same version again is harmless.
    assert store.install(bundle.manifest_data, bundle.signature, bundle.model_path).version == "1"


def test_active_lkg_and_order_survive_a_reopen(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    for v in ("1", "2"):
        b = make_bundle(tmp_path / v, tiny_int8_model, keys, version=v)
        store.install(b.manifest_data, b.signature, b.model_path)
    store.set_active("digits", "1")
    store.mark_good("digits", "1")
    store.set_active("digits", "2")
    again = new_store(tmp_path, keys)
    rec = again.record("digits")
    assert (rec.active, rec.last_known_good, rec.previous, rec.installed) == (
        "2",
        "1",
        "1",
        ["1", "2"],
    )
    state = json.loads((store.root / "state.json").read_text())
    assert state["models"]["digits"]["active"] == "2"


def test_keeps_last_k_but_never_active_or_lkg(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys, keep_versions=2)
    for v in ("1", "2", "3", "4", "5"):
        b = make_bundle(tmp_path / v, tiny_int8_model, keys, version=v)
        store.install(b.manifest_data, b.signature, b.model_path)
        if v == "1":
            store.set_active("digits", "1")
            store.mark_good("digits", "1")
    store.set_active("digits", "2")
    removed = store.prune("digits")
    assert removed == ["3"]
    assert store.versions("digits") == ["1", "2", "4", "5"]
    assert not (store.root / "digits/3").exists()
    with pytest.raises(StoreError, match="active or last-known-good"):
        store.remove("digits", "1")


def refused(
    store: ModelStore, manifest: object, signature: str | None, model: Path, code: ReplyCode
) -> str:
    with pytest.raises(StoreError) as info:
        store.install(manifest, signature, model)  # type: ignore[arg-type]
    assert info.value.code == code, info.value.message
    assert "\n" not in info.value.message
    assert leftovers(store) == []
    assert store.versions("digits") in ([], ["1"])
    return info.value.message


@pytest.fixture
def installed(tmp_path: Path, keys: Keys, tiny_int8_model: Path) -> ModelStore:
    """A store with version 1 active, so each refusal can show the active one is untouched."""
    store = new_store(tmp_path, keys)
    b = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b.manifest_data, b.signature, b.model_path)
    store.set_active("digits", "1")
    return store


def sign(data: dict, keys: Keys) -> str:
    return mf.sign_manifest(data, keys.private)


def test_truncated_file(
    installed: ModelStore, tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    data = manifest_for(tiny_int8_model, version="2")
    short = tmp_path / "short.tflite"
    short.write_bytes(tiny_int8_model.read_bytes()[:-100])
    msg = refused(installed, data, sign(data, keys), short, ReplyCode.CHECKSUM_MISMATCH)
    assert "truncated" in msg
    assert installed.record("digits").active == "1"


def test_sha256_mismatch(
    installed: ModelStore, tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    data = manifest_for(tiny_int8_model, version="2")
    flipped = bytearray(tiny_int8_model.read_bytes())
    flipped[200] ^= 0xFF
    bad = tmp_path / "flipped.tflite"
    bad.write_bytes(bytes(flipped))
    msg = refused(installed, data, sign(data, keys), bad, ReplyCode.CHECKSUM_MISMATCH)
    assert "sha256" in msg


def test_missing_signature(installed: ModelStore, keys: Keys, tiny_int8_model: Path) -> None:
    data = manifest_for(tiny_int8_model, version="2")
    msg = refused(installed, data, None, tiny_int8_model, ReplyCode.BAD_SIGNATURE)
    assert "not signed" in msg


def test_bad_signature(installed: ModelStore, keys: Keys, tiny_int8_model: Path) -> None:
    data = manifest_for(tiny_int8_model, version="2")
    sig = sign(data, keys)
    data["task"] = "raw"  # signed one manifest, sent another
    msg = refused(installed, data, sig, tiny_int8_model, ReplyCode.BAD_SIGNATURE)
    assert "does not verify" in msg
    msg = refused(installed, data, "%%%not base64", tiny_int8_model, ReplyCode.BAD_SIGNATURE)
    assert "base64" in msg


def test_unknown_key(installed: ModelStore, tiny_int8_model: Path) -> None:
    stranger = make_keys()
    data = manifest_for(tiny_int8_model, version="2")
    msg = refused(installed, data, sign(data, stranger), tiny_int8_model, ReplyCode.BAD_SIGNATURE)
    assert "trusted key" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "../evil"),
        ("name", "a/b"),
        ("name", ".."),
        ("version", ".."),
        ("version", "1/../../x"),
        ("version", "v 2"),
        ("version", "vé"),
        ("version", ""),
    ],
)
def test_unsafe_name_or_version(
    installed: ModelStore, keys: Keys, tiny_int8_model: Path, field: str, value: str
) -> None:
    data = manifest_for(tiny_int8_model, **{field: value})
    msg = refused(installed, data, sign(data, keys), tiny_int8_model, ReplyCode.BAD_MANIFEST)
    assert repr(value) in msg
    assert not any(p.name == "evil" or p.name == "x" for p in installed.root.parent.rglob("*"))


@pytest.mark.parametrize("missing", ["model", "inputs", "task", "version"])
def test_manifest_with_missing_fields(
    installed: ModelStore, keys: Keys, tiny_int8_model: Path, missing: str
) -> None:
    data = manifest_for(tiny_int8_model, version="2")
    del data[missing]
    msg = refused(installed, data, sign(data, keys), tiny_int8_model, ReplyCode.BAD_MANIFEST)
    assert f"{missing}: required key missing" in msg


def test_version_reused_for_other_content(
    installed: ModelStore, keys: Keys, tmp_path: Path, tiny_float_model: Path
) -> None:
    data = manifest_for(tiny_float_model, version="1")
    msg = refused(installed, data, sign(data, keys), tiny_float_model, ReplyCode.BAD_MANIFEST)
    assert "already installed with other content" in msg


class DiskFillsUp:
    """A write function that behaves like a disk with ``room`` bytes left."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: self.room])
        self.room -= n
        return n


@pytest.mark.parametrize("room", [0, 1000, "model+10"])
def test_disk_full_during_install(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path, room: int | str
) -> None:
    disk = DiskFillsUp(10**9)
    store = new_store(tmp_path, keys, write=disk)
    b1 = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b1.manifest_data, b1.signature, b1.model_path)
    store.set_active("digits", "1")
    disk.room = tiny_int8_model.stat().st_size + 10 if room == "model+10" else int(room)
    data = manifest_for(tiny_int8_model, version="2")
    msg = refused(store, data, sign(data, keys), tiny_int8_model, ReplyCode.STORAGE_FAILED)
    assert "disk full" in msg
    assert not (store.root / "digits/2").exists()
    again = new_store(tmp_path, keys)
    assert again.record("digits").active == "1"
    assert again.versions("digits") == ["1"]


def test_disk_full_writing_the_state_file_keeps_the_old_state(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    disk = DiskFillsUp(10**9)
    store = new_store(tmp_path, keys, write=disk)
    b1 = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b1.manifest_data, b1.signature, b1.model_path)
    store.set_active("digits", "1")
    disk.room = 0
    with pytest.raises(StoreError, match="state file") as info:
        store.mark_good("digits", "1")
    assert info.value.code == ReplyCode.STORAGE_FAILED
    assert store.record("digits").last_known_good is None
    assert leftovers(store) == []
    assert new_store(tmp_path, keys).record("digits").active == "1"


def test_open_removes_leftovers_of_a_crashed_install(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    half = store.root / ".incoming/digits-2.abc"
    half.mkdir(parents=True)
    (half / "model.tflite").write_bytes(b"half")
    (store.root / ".state.json.x.tmp").write_text("{")
    new_store(tmp_path, keys)
    assert leftovers(store) == []


def test_corrupt_state_file_falls_back_to_what_is_on_disk(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    b = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b.manifest_data, b.signature, b.model_path)
    (store.root / "state.json").write_text("{not json")
    again = new_store(tmp_path, keys)
    assert again.versions("digits") == ["1"]
    assert again.record("digits").active is None


def test_get_with_verify_finds_a_corrupt_file(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    b = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    stored = store.install(b.manifest_data, b.signature, b.model_path)
    with stored.model_path.open("r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    store.get("digits", "1")  # without verify, only the manifest is read
    with pytest.raises(StoreError) as info:
        store.get("digits", "1", verify=True)
    assert info.value.code == ReplyCode.CHECKSUM_MISMATCH
    with pytest.raises(StoreError) as info:
        store.get("digits", "9")
    assert info.value.code == ReplyCode.NOT_FOUND


def test_unsigned_bundles_when_signatures_are_not_required(
    tmp_path: Path, tiny_int8_model: Path
) -> None:
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    data = manifest_for(tiny_int8_model)
    assert store.install(data, None, tiny_int8_model).version == "1"


class DiskThatStalls:
    """A write function that blocks (like a slow SD card) on the writes ``which`` picks."""

    def __init__(self, which: str) -> None:
        self.which = which
        self.stalled = threading.Event()
        self.release = threading.Event()

    def __call__(self, fd: int, data: bytes) -> int:
        is_state = data.startswith(b'{\n  "models"')
        if (self.which == "state") == is_state and not self.release.is_set():
            self.stalled.set()
            self.release.wait(60)
        return os.write(fd, data)


@pytest.mark.parametrize("which", ["model", "state"])
def test_readers_never_wait_for_the_disk(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path, which: str
) -> None:
    """Fails on the old code: install held the store's lock while it copied and hashed
    (and while it wrote the state file), so ``record()`` (asked by the MQTT thread for
    the model states) waited on the disk."""
    disk = DiskThatStalls(which)
    store = new_store(tmp_path, keys, write=disk)
    b1 = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    b2 = make_bundle(tmp_path / "v2", tiny_int8_model, keys, version="2")
    disk.release.set()
    store.install(b1.manifest_data, b1.signature, b1.model_path)
    store.set_active("digits", "1")
    disk.release.clear()
    installer = threading.Thread(
        target=store.install, args=(b2.manifest_data, b2.signature, b2.model_path)
    )
    installer.start()
    try:
        assert disk.stalled.wait(30), "the install never reached the disk"
        answers: list[object] = []
        reader = threading.Thread(
            target=lambda: answers.extend([store.record("digits"), store.names()])
        )
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "a reader waited for the install's disk I/O"
        # Until the install is durable the readers see the state before it.
        rec = answers[0]
        assert isinstance(rec, ModelRecord)
        assert (rec.active, rec.installed) == ("1", ["1"])
    finally:
        disk.release.set()
        installer.join(30)
    assert store.versions("digits") == ["1", "2"]
    assert leftovers(store) == []


def test_reads_state_files_written_before_the_trial_keys(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    b = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b.manifest_data, b.signature, b.model_path)
    old = {"active": "1", "last_known_good": "1", "previous": None, "installed": ["1"]}
    (store.root / "state.json").write_text(json.dumps({"models": {"digits": old}}))
    rec = new_store(tmp_path, keys).record("digits")
    assert (rec.active, rec.last_known_good, rec.installed) == ("1", "1", ["1"])
    assert (rec.trial, rec.failed, rec.failure) == (None, [], None)


def test_trial_is_recorded_with_the_install_and_ends_with_good_or_failed(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    store = new_store(tmp_path, keys)
    for v in ("1", "2"):
        b = make_bundle(tmp_path / v, tiny_int8_model, keys, version=v)
        store.install(b.manifest_data, b.signature, b.model_path, trial=True)
        assert new_store(tmp_path, keys).record("digits").trial == v  # durable at once
        store.set_active("digits", v)
        if v == "1":
            store.mark_good("digits", "1")
            assert store.record("digits").trial is None
    note = {"version": "2", "code": "probation_failed", "message": "x", "rolled_back_to": "1"}
    store.fail_trial("digits", "2", note, active="1")
    rec = new_store(tmp_path, keys).record("digits")
    assert (rec.active, rec.trial, rec.failed, rec.failure) == ("1", None, ["2"], note)
    assert rec.installed == ["1", "2"]


def test_a_state_naming_a_version_that_never_arrived(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    """The state is written before the rename: a crash between them names a missing one."""
    store = new_store(tmp_path, keys)
    b = make_bundle(tmp_path / "v1", tiny_int8_model, keys)
    store.install(b.manifest_data, b.signature, b.model_path)
    store.set_active("digits", "1")
    data = json.loads((store.root / "state.json").read_text())
    data["models"]["digits"].update(installed=["1", "2"], trial="2")
    (store.root / "state.json").write_text(json.dumps(data))
    rec = new_store(tmp_path, keys).record("digits")
    assert (rec.active, rec.installed, rec.trial) == ("1", ["1"], None)
