"""The command plane over the in-memory link, with a fake CommandTarget."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol as p
from agent.link import commands
from agent.link.command_record import CommandRecord, Route
from agent.link.commands import CommandDispatcher, CommandTarget
from agent.link.signing import sign_command
from agent.link.transfer import ArtifactFetcher
from tests.link_support import FakeLink, FakeTarget, Published, make_config, model_manifest

CMD = "edge/pi-1/cmd"
REPLY = "edge/pi-1/reply"


class Plane:
    def __init__(self, tmp_path: Path, **sections: Any) -> None:
        self.config = make_config(tmp_path / "state", **sections)
        self.link = FakeLink()
        self.target = FakeTarget()
        _target: CommandTarget = self.target  # the fake follows the Protocol
        self.fetcher = ArtifactFetcher(self.config, self.link)
        self.changed = 0
        self.dispatcher = CommandDispatcher(
            self.config, self.link, _target, self.fetcher, state_changed=self._changed
        )

    def _changed(self) -> None:
        self.changed += 1

    def send(self, payload: bytes | dict[str, Any], topic: str = CMD, **kwargs: Any) -> None:
        raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        self.link.deliver(topic, raw, **kwargs)

    def replies(self, command_id: str | None = None, topic: str = REPLY) -> list[dict[str, Any]]:
        out = []
        for m in list(self.link.published):
            if m.topic == topic:
                r = json.loads(m.payload)
                if command_id is None or r["id"] == command_id:
                    out.append(r)
        return out

    def final(self, command_id: str, timeout: float = 10.0, topic: str = REPLY) -> dict[str, Any]:
        def done(pub: list[Published]) -> bool:
            return any(r["status"] in ("done", "failed") for r in self.replies(command_id, topic))

        self.link.wait_for(done, timeout)
        return next(r for r in self.replies(command_id, topic) if r["status"] in ("done", "failed"))


@pytest.fixture
def plane(tmp_path: Path) -> Any:
    plane = Plane(tmp_path)
    plane.dispatcher.start()
    yield plane
    plane.dispatcher.stop()


def test_subscribes_to_device_and_group_topics(plane: Plane) -> None:
    assert set(plane.link.handlers) == {CMD, "edge/group/kitchen/cmd"}


def test_ping_gets_accepted_then_done(plane: Plane) -> None:
    plane.send({"id": "p1", "op": "ping"})
    assert plane.final("p1")["code"] == "ok"
    assert [r["status"] for r in plane.replies("p1")] == ["accepted", "done"]


def test_group_command_is_obeyed(plane: Plane) -> None:
    plane.send({"id": "g1", "op": "ping"}, topic="edge/group/kitchen/cmd")
    assert plane.final("g1")["status"] == "done"


@pytest.mark.parametrize(
    ("payload", "code", "reply_id"),
    [
        (b'{"id": "u1", "op": "reboot"}', "unknown_op", "u1"),
        (b'{"id": "s1", "op": "rollback"}', "schema", "s1"),
        (b'{"id": "s2", "op": "ping", "extra": 1}', "schema", "s2"),
    ],
)
def test_malformed_commands_get_failed_replies(
    plane: Plane, payload: bytes, code: str, reply_id: str
) -> None:
    plane.send(payload)
    reply = plane.final(reply_id)
    assert (reply["status"], reply["code"]) == ("failed", code)
    assert reply["message"]


def _ping_answered(plane: Plane, command_id: str, topic: str = CMD) -> None:
    plane.send({"id": command_id, "op": "ping"}, topic=topic)
    assert plane.final(command_id)["status"] == "done"


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "schema"),
        (b'{"id": "big", "op": "ping", "pad": "' + b"x" * p.MAX_COMMAND_BYTES + b'"}', "too_large"),
        (b"\xff\xfe\x00", "bad_json"),
        (b"[" * 2000, "schema"),
    ],
)
def test_payloads_without_an_id_are_counted_not_answered(
    plane: Plane, payload: bytes, kind: str
) -> None:
    plane.send(payload)
    _ping_answered(plane, "after")  # the commands thread handles messages in order
    assert plane.dispatcher.refused == {kind: 1}
    assert [r["id"] for r in plane.replies()] == ["after", "after"]
    status_id = "st-after"
    plane.send({"id": status_id, "op": "status"})
    assert plane.final(status_id)["data"]["commands"]["refused"] == {kind: 1}


def test_deep_nesting_on_the_group_topic_does_not_silence_the_device(plane: Plane) -> None:
    # Issue 14: b"[" * 2000 raised RecursionError twice and ended the commands thread.
    for _ in range(3):
        plane.send(b"[" * 2000, topic="edge/group/kitchen/cmd")
        plane.send(b"{" * 100_000, topic="edge/group/kitchen/cmd")
    _ping_answered(plane, "alive-1", topic="edge/group/kitchen/cmd")
    assert plane.dispatcher.refused == {"schema": 6}


def test_the_last_resort_handler_cannot_end_the_thread(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_args: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    real_get = plane.dispatcher._recent.get
    monkeypatch.setattr(plane.dispatcher._recent, "get", explode)
    plane.send({"id": "boom1", "op": "ping"})
    reply = plane.final("boom1")
    assert (reply["status"], reply["code"]) == ("failed", "internal")
    # Now the failure path fails too: the payload is counted, the thread lives.
    monkeypatch.setattr(p, "command_id_of", explode)
    plane.send({"id": "boom2", "op": "ping"})
    plane.link.wait_for(lambda _: plane.dispatcher.refused.get("last_resort_failed") == 1)
    monkeypatch.setattr(plane.dispatcher._recent, "get", real_get)
    _ping_answered(plane, "alive-2")


def test_expired_command_is_refused(plane: Plane) -> None:
    plane.send({"id": "e1", "op": "ping", "expires_at": time.time() - 60})
    reply = plane.final("e1")
    assert (reply["status"], reply["code"]) == ("failed", "expired")


def test_repeated_id_is_answered_but_not_executed_twice(tmp_path: Path) -> None:
    plane = Plane(tmp_path)
    plane.dispatcher.start()
    plane.send({"id": "r1", "op": "rollback", "model": "digits"})
    assert plane.final("r1")["status"] == "done"
    plane.dispatcher.stop()
    # Ids survive a restart of the agent.
    again = Plane(tmp_path)
    again.dispatcher.start()
    try:
        again.send({"id": "r1", "op": "rollback", "model": "digits"})
        reply = again.final("r1")
        assert (reply["status"], reply["code"]) == ("failed", "duplicate")
        assert reply["data"]["original"]["status"] == "done"
        assert again.target.calls == []
        assert plane.target.calls == [("rollback", "digits")]
    finally:
        again.dispatcher.stop()


def test_response_topic_and_correlation_data_are_honoured(plane: Plane) -> None:
    plane.send(
        {"id": "c1", "op": "ping"}, response_topic="edge/replies/console-7", correlation_data=b"k"
    )
    reply = plane.final("c1", topic="edge/replies/console-7")
    assert reply["status"] == "done"
    sent = [m for m in plane.link.published if m.topic == "edge/replies/console-7"]
    assert {m.correlation_data for m in sent} == {b"k"}


@pytest.mark.parametrize(
    "topic",
    [
        "edge/pi-1/state",
        "edge/pi-1/results/cam",
        "edge/pi-1/telemetry",
        "edge/pi-1/cmd",
        "edge/pi-2/reply",
        "edge/pi-2/state",
        "edge/group/kitchen/cmd",
        "edge/transfer/t1",
        "edge/replies/state",  # a device named "replies" has topics too
        "console/7/replies",
        "$SYS/broker",
    ],
)
def test_response_topics_outside_the_reply_prefixes_are_not_used(plane: Plane, topic: str) -> None:
    # Issue 14: the reply went to whatever response topic the sender named.
    plane.send({"id": "rt1", "op": "ping"}, response_topic=topic, correlation_data=b"c")
    reply = plane.final("rt1")  # on the device's own reply topic instead
    assert reply["status"] == "done"
    assert not any(m.topic == topic for m in plane.link.published)
    assert {m.correlation_data for m in plane.link.published} == {b"c"}
    assert plane.dispatcher.counters["response_topics_refused"] == {"not allowed": 1}


def test_configured_reply_topics_replace_the_default(tmp_path: Path) -> None:
    plane = Plane(tmp_path, mqtt={"reply_topics": ["consoles/+/inbox"]})
    plane.dispatcher.start()
    try:
        plane.send({"id": "q1", "op": "ping"}, response_topic="consoles/a/inbox")
        assert plane.final("q1", topic="consoles/a/inbox")["status"] == "done"
        plane.send({"id": "q2", "op": "ping"}, response_topic="edge/replies/x")
        assert plane.final("q2")["status"] == "done"  # own reply topic: always allowed
    finally:
        plane.dispatcher.stop()


def test_target_failures_become_coded_replies(plane: Plane) -> None:
    plane.send({"id": "cf1", "op": "config", "changes": {"bad": 1}})
    assert plane.final("cf1")["code"] == "config_rejected"
    plane.send({"id": "rs1", "op": "restart"})
    reply = plane.final("rs1")
    assert (reply["code"], reply["message"]) == ("internal", "internal error: boom")
    plane.send({"id": "cf2", "op": "config", "changes": {"telemetry.interval_s": 5}})
    assert plane.final("cf2")["data"] == {"applied": ["telemetry.interval_s"]}


def _deploy(command_id: str, url: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "id": command_id,
        "op": "deploy",
        "manifest": model_manifest(data),
        "artifact": {"kind": "url", "url": url},
        **extra,
    }


def test_deploy_from_a_file_url_reaches_the_target(tmp_path: Path) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"TFL3" * 1000)
        plane.send(_deploy("d1", model.as_uri(), model.read_bytes()))
        reply = plane.final("d1")
        assert reply["status"] == "done", reply
        assert reply["data"] == {"model": "digits", "version": "2"}
        assert plane.target.model_bytes == [model.read_bytes()]
        stages = [r.get("stage") for r in plane.replies("d1") if r["status"] == "progress"]
        assert stages[0] == "downloading" and "validating" in stages
        assert plane.changed == 1
        # The downloaded file is gone afterwards.
        assert list((plane.config.state_dir / "tmp").iterdir()) == []
    finally:
        plane.dispatcher.stop()


def test_deploy_with_a_wrong_checksum_never_reaches_the_target(tmp_path: Path) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"TFL3" * 10)
        plane.send(_deploy("d2", model.as_uri(), b"other bytes!" * 3 + b"abcd"))
        reply = plane.final("d2")
        assert reply["code"] == "checksum_mismatch", reply
        assert plane.target.calls == []
    finally:
        plane.dispatcher.stop()


def test_ping_and_status_are_answered_during_a_long_deploy(tmp_path: Path) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"TFL3")
        plane.target.release.clear()
        plane.send(_deploy("slow", model.as_uri(), b"TFL3"))
        plane.link.wait_for(
            lambda _: any(r.get("stage") == "validating" for r in plane.replies("slow"))
        )
        plane.send({"id": "pg", "op": "ping"})
        plane.send({"id": "st", "op": "status"})
        assert plane.final("pg")["status"] == "done"
        status = plane.final("st")
        assert status["data"]["models"][0]["name"] == "digits"
        assert not any(r["status"] == "done" for r in plane.replies("slow"))
        plane.target.release.set()
        assert plane.final("slow")["status"] == "done"
    finally:
        plane.target.release.set()
        plane.dispatcher.stop()


def test_deploy_failure_from_target_is_reported_with_its_code(tmp_path: Path) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"TFL3")
        plane.target.fail_with = p.CommandFailed(p.ReplyCode.VALIDATION_FAILED, "invoke crashed")
        plane.send(_deploy("d3", model.as_uri(), b"TFL3"))
        reply = plane.final("d3")
        assert (reply["code"], reply["message"]) == ("validation_failed", "invoke crashed")
    finally:
        plane.dispatcher.stop()


# ------------------------------------------------------------------- signed commands


@pytest.fixture
def signed_plane(tmp_path: Path) -> Any:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "commands.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    plane = Plane(tmp_path, mqtt={"require_signed_commands": True, "command_keys": [str(pub)]})
    plane.dispatcher.start()
    yield plane, key
    plane.dispatcher.stop()


def _signed(key: Ed25519PrivateKey, command_id: str, **auth: Any) -> dict[str, Any]:
    fields = {"target": "device/pi-1", "ts": time.time(), "nonce": f"nonce-{command_id}", **auth}
    return sign_command({"id": command_id, "op": "ping", "auth": fields}, key)


def test_signed_command_is_obeyed_and_its_replay_refused(signed_plane: Any) -> None:
    plane, key = signed_plane
    command = _signed(key, "s1")
    plane.send(command)
    assert plane.final("s1")["status"] == "done"
    # Same nonce under a new id: the signature no longer matches; same bytes: replay.
    plane.send({**command, "id": "s1b"})
    assert plane.final("s1b")["code"] == "bad_signature"
    plane.send(_signed(key, "s2", nonce="nonce-s1"))
    reply = plane.final("s2")
    assert (reply["code"], "replay" in reply["message"]) == ("bad_signature", True)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"target": "device/pi-2"}, "not for this device"),
        ({"target": "group/garage"}, "not for this device"),
        ({"ts": time.time() - 3600}, "signed"),
    ],
)
def test_signed_commands_for_others_or_stale_are_refused(
    signed_plane: Any, change: dict[str, Any], words: str
) -> None:
    plane, key = signed_plane
    plane.send(_signed(key, "x1", **change))
    reply = plane.final("x1")
    assert reply["code"] == "bad_signature" and words in reply["message"]


def test_unsigned_or_foreign_signed_commands_are_refused(signed_plane: Any) -> None:
    plane, _key = signed_plane
    plane.send({"id": "u1", "op": "ping"})
    assert "unsigned" in plane.final("u1")["message"]
    plane.send(_signed(Ed25519PrivateKey.generate(), "u2"))
    assert "does not verify" in plane.final("u2")["message"]
    plane.send(_signed(Ed25519PrivateKey.generate(), "u3", target="group/kitchen"))
    assert plane.final("u3")["code"] == "bad_signature"


# --------------------------------------------------------------------------- fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_commandish = st.fixed_dictionaries(
    {"id": st.text(max_size=10) | st.integers(), "op": st.sampled_from([*p.COMMAND_OPS, "nope"])},
    optional={
        "model": _json,
        "changes": _json,
        "manifest": _json,
        "artifact": _json
        | st.fixed_dictionaries(
            {"kind": st.sampled_from(["url", "mqtt", "http"]), "url": st.text(max_size=30)}
        ),
        "expires_at": st.floats(allow_nan=False) | st.text(max_size=5),
        "pipeline": _json,
        "to_version": _json,
        "auth": _json,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=200)
    | _json.map(lambda v: json.dumps(v).encode())
    | _commandish.map(lambda v: json.dumps(v).encode())
)
def test_every_fuzzed_payload_gets_a_final_reply_or_is_counted(
    plane: Plane, payload: bytes
) -> None:
    token = base64.b64encode(hashlib.sha256(payload + str(time.monotonic()).encode()).digest()[:9])
    refused_before = sum(plane.dispatcher.refused.values())
    plane.send(payload, response_topic="edge/replies/fuzz", correlation_data=token)
    # The plane still answers: by then the fuzzed payload was received, and refused
    # (counted) or taken; a command taken runs on its lane and may answer after the ping.
    plane.send(
        {"id": "alive", "op": "ping"}, response_topic="edge/replies/alive", correlation_data=token
    )
    plane.link.wait_for(
        lambda pub: any(m.correlation_data == token for m in pub if m.topic == "edge/replies/alive")
    )

    def answered(pub: list[Published]) -> bool:
        return any(
            m.correlation_data == token and json.loads(m.payload)["status"] in ("done", "failed")
            for m in pub
            if m.topic == "edge/replies/fuzz"
        )

    counted = sum(plane.dispatcher.refused.values()) == refused_before + 1
    if not counted:
        plane.link.wait_for(answered)
    assert answered(list(plane.link.published)) != counted


# ------------------------------------------------------------- lanes and the bound


def _blocking_deploy(plane: Plane, tmp_path: Path, command_id: str) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(b"TFL3")
    plane.send(_deploy(command_id, model.as_uri(), b"TFL3"))
    plane.link.wait_for(
        lambda _: any(r.get("stage") == "validating" for r in plane.replies(command_id))
    )


def test_rollback_and_config_do_not_wait_behind_a_running_deploy(tmp_path: Path) -> None:
    # Issue 14: one executor thread ran everything in order, so a rollback waited.
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        plane.target.release.clear()
        _blocking_deploy(plane, tmp_path, "long")
        plane.send({"id": "rb", "op": "rollback", "model": "digits"})
        plane.send({"id": "cf", "op": "config", "changes": {"telemetry.interval_s": 5}})
        assert plane.final("rb")["status"] == "done"
        assert plane.final("cf")["status"] == "done"
        assert not any(r["status"] == "done" for r in plane.replies("long"))
    finally:
        plane.target.release.set()
        plane.dispatcher.stop()


def test_long_commands_past_the_bound_are_busy_at_once(tmp_path: Path) -> None:
    # Issue 14: the executor's queue was unbounded (3000 deploys sat queued).
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    try:
        plane.target.release.clear()
        _blocking_deploy(plane, tmp_path, "run-0")
        bound = commands.MAX_PENDING_PER_LANE
        for i in range(bound + 3):
            plane.send({"id": f"rs-{i}", "op": "restart"})
        for i in range(bound, bound + 3):
            reply = plane.final(f"rs-{i}")
            assert (reply["status"], reply["code"]) == ("failed", "busy"), reply
        _ping_answered(plane, "still-prompt")
        # A busy command was not recorded: the same id may be sent again later.
        plane.target.release.set()
        for i in range(bound):
            plane.final(f"rs-{i}")
        plane.send({"id": f"rs-{bound}", "op": "restart"})
        plane.link.wait_for(
            lambda _: [r["code"] for r in plane.replies(f"rs-{bound}")][-1:] == ["internal"]
        )
    finally:
        plane.target.release.set()
        plane.dispatcher.stop()


# --------------------------------------------------- replies that cannot be recorded


class _FullDisk:
    """A sqlite connection whose writes fail as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.lstrip().split()[0].upper() in ("INSERT", "DELETE", "UPDATE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def close(self) -> None:
        self._db.close()


def test_a_full_disk_does_not_lose_ping_status_or_final_replies(plane: Plane) -> None:
    # Issue 14: the final reply was lost when recording the command failed.
    record = plane.dispatcher._recent
    record._db = _FullDisk(record._db)  # type: ignore[assignment, arg-type]
    plane.send({"id": "fd-ping", "op": "ping"})
    assert plane.final("fd-ping")["status"] == "done"
    plane.send({"id": "fd-status", "op": "status"})
    assert plane.final("fd-status")["status"] == "done"
    plane.send({"id": "fd-config", "op": "config", "changes": {"bad": 1}})
    assert plane.final("fd-config")["code"] == "config_rejected"


def test_a_lone_surrogate_in_a_failure_message_does_not_lose_the_reply(plane: Plane) -> None:
    # Issue 14: a config key with a lone surrogate made recording raise UnicodeEncodeError.
    def reject(changes: dict[str, Any]) -> dict[str, Any]:
        raise p.CommandFailed(p.ReplyCode.CONFIG_REJECTED, f"no such option: {next(iter(changes))}")

    plane.target.apply_config = reject  # type: ignore[method-assign]
    plane.send(b'{"id": "sur", "op": "config", "changes": {"a\\ud800b": 1}}')
    reply = plane.final("sur")
    assert reply["code"] == "config_rejected"
    assert "a\\ud800b" in reply["message"]
    # Recorded too, so a repeat is a duplicate with the same outcome.
    plane.send(b'{"id": "sur", "op": "config", "changes": {"a\\ud800b": 1}}')
    plane.link.wait_for(lambda _: [r["code"] for r in plane.replies("sur")][-1:] == ["duplicate"])


# ----------------------------------------------------------------- stop and restart


def test_stop_waits_for_the_running_command_to_reply_and_record(tmp_path: Path) -> None:
    # Issue 14: stop closed the record at once; the deploy's reply hit a closed database.
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    plane.target.release.clear()
    _blocking_deploy(plane, tmp_path, "during-stop")
    releaser = threading.Timer(0.5, plane.target.release.set)
    releaser.start()
    plane.dispatcher.stop(timeout=20)
    releaser.join()
    assert plane.final("during-stop", timeout=1)["status"] == "done"
    record = CommandRecord(plane.config.state_dir / "commands.sqlite3")
    record.open()
    try:
        done = record.get("during-stop")
        assert done is not None and done["status"] == "done"
        assert done["data"] == {"model": "digits", "version": "2"}
    finally:
        record.close()


def test_a_reply_after_the_stop_deadline_is_harmless(tmp_path: Path) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    plane.dispatcher.start()
    plane.target.release.clear()
    _blocking_deploy(plane, tmp_path, "late")
    plane.dispatcher.stop(timeout=0.2)
    plane.target.release.set()
    assert plane.final("late")["status"] == "done"  # still sent
    plane.link.wait_for(lambda _: plane.dispatcher.counters["unrecorded"] == {"done": 1})
    # Not recorded as done: the next start answers it as interrupted instead.
    again = Plane(tmp_path)
    again.dispatcher.start()
    try:
        reply = again.final("late")
        assert (reply["code"], reply["message"]) == ("interrupted", commands.INTERRUPTED_MESSAGE)
        assert reply["data"] == {"op": "deploy", "stage": "validating"}  # where it was
    finally:
        again.dispatcher.stop()


def test_accepted_commands_are_answered_interrupted_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    record = CommandRecord(state / "commands.sqlite3")
    record.open()
    record.accept("dep-9", "deploy", Route("edge/replies/console-1", b"corr-9"))
    record.note_stage("dep-9", "receiving")
    record.accept("rb-9", "rollback", Route("edge/pi-1/reply", None))
    record.record("done-9", "done", p.ReplyCode.OK)
    record.close()
    plane = Plane(tmp_path)
    plane.link.set_connected(False)
    plane.dispatcher.start()
    try:
        time.sleep(0.2)  # the commands thread runs; nothing may go out while offline
        assert plane.link.published == []
        plane.link.set_connected(True)
        dep = plane.final("dep-9", topic="edge/replies/console-1")
        assert (dep["status"], dep["code"]) == ("failed", "interrupted")
        assert dep["data"] == {"op": "deploy", "stage": "receiving"}
        assert plane.final("rb-9")["code"] == "interrupted"
        sent = [m for m in plane.link.published if m.topic == "edge/replies/console-1"]
        assert [m.correlation_data for m in sent] == [b"corr-9"]
        # Marked answered (on the broker's acknowledgement): a repeat is a duplicate.
        plane.send({"id": "dep-9", "op": "ping"})
        plane.link.wait_for(
            lambda _: [r["code"] for r in plane.replies("dep-9")][-1:] == ["duplicate"]
        )
        assert plane.replies("dep-9")[-1]["data"]["original"]["code"] == "interrupted"
    finally:
        plane.dispatcher.stop()
    assert len([r for r in plane.replies("rb-9") if r["code"] == "interrupted"]) == 1


class ShadowTarget(FakeTarget):
    """Takes a deploy's own shadow settings and reports the shadow stage's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[dict[str, Any]] = []

    def deploy(  # type: ignore[override]
        self,
        manifest: dict[str, Any],
        signature: str | None,
        model_file: Path,
        pipeline: str | None,
        progress: p.Progress,
        **checks: Any,
    ) -> dict[str, Any]:
        self.checks.append(checks)
        progress("shadow", 40.0, {"frames": 40, "agreement": 0.975, "distance": None})
        return {"model": manifest.get("name"), "version": manifest.get("version")}


def test_a_deploys_shadow_settings_reach_the_target_and_its_figures_the_replies(
    tmp_path: Path,
) -> None:
    plane = Plane(tmp_path, transfer={"allowed_schemes": ["file"]})
    target = plane.dispatcher._target = ShadowTarget()
    plane.dispatcher.start()
    try:
        model = tmp_path / "model.tflite"
        model.write_bytes(b"TFL3" * 1000)
        plane.send(_deploy("s1", model.as_uri(), model.read_bytes()))
        plane.send(
            _deploy("s2", model.as_uri(), model.read_bytes(), shadow=False, min_agreement=0.7)
        )
        assert plane.final("s1")["status"] == "done" and plane.final("s2")["status"] == "done"
        # Only what a command sets is passed: a target that knows none of it still works.
        assert target.checks == [{}, {"shadow": False, "min_agreement": 0.7}]
        (shadow,) = [r for r in plane.replies("s1") if r.get("stage") == "shadow"]
        assert (shadow["status"], shadow["percent"]) == ("progress", 40.0)
        assert shadow["data"] == {"frames": 40, "agreement": 0.975, "distance": None}
        plane.send(_deploy("s3", model.as_uri(), model.read_bytes(), min_agreement=1.5))
        assert plane.final("s3")["code"] == "schema"
    finally:
        plane.dispatcher.stop()
