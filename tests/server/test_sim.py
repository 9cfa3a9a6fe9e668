"""SimFleet against a real Mosquitto and a real Console: it speaks the protocol."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import (
    DeployCommand,
    PingCommand,
    Reply,
    ReplyCode,
    RollbackCommand,
    State,
    StatusCommand,
    UrlArtifact,
)
from fleet.console import BrokerOptions, Console, Event, InvalidEvent, TelemetryEvent
from fleet.sim import SimFleet
from tests.fleet_support import manifest_of
from tests.mqtt_support import Broker, MessageCollector

PREFIX = "simt"
DEPLOY_STAGES = [
    ("accepted", None),
    ("progress", "downloading"),
    ("progress", "downloading"),
    ("progress", "installing"),
    ("progress", "validating"),
    ("progress", "swapping"),
    ("progress", "probation"),
    ("done", None),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def console(broker: Broker) -> Iterator[Console]:
    c = Console(BrokerOptions(broker.host, broker.port, prefix=PREFIX), share_group="edge-fleet")
    c.connect()
    yield c
    c.close()


@pytest.fixture
def replies(broker: Broker) -> Iterator[MessageCollector]:
    collector = MessageCollector(broker, f"{PREFIX}/+/reply")
    yield collector
    collector.close()


def sim(broker: Broker, n: int = 5, **kw: Any) -> SimFleet:
    options: dict[str, Any] = {"per_connection": 2, "interval_s": 0.05, "groups": ["lab"]}
    options.update(kw)
    return SimFleet(
        broker.host,
        broker.port,
        prefix=PREFIX,
        devices=[f"sim-{i}" for i in range(n)],
        **options,
    )


def manifest(version: str, name: str = "digits") -> dict[str, Any]:
    return manifest_of(b"not a real model", version=version, name=name)


def deploy(cid: str, version: str, url: str = "http://127.0.0.1:9/model.tflite") -> DeployCommand:
    return DeployCommand(id=cid, manifest=manifest(version), artifact=UrlArtifact(url=url))


def wait(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def replies_to(collector: MessageCollector, cid: str) -> list[Reply]:
    parsed = [Reply.model_validate_json(m.payload) for m in list(collector.messages)]
    return [r for r in parsed if r.id == cid]


def final(collector: MessageCollector, cid: str) -> Reply:
    wait(
        lambda: any(r.status in ("done", "failed") for r in replies_to(collector, cid)),
        f"the final reply to {cid}",
    )
    return replies_to(collector, cid)[-1]


def steps(collector: MessageCollector, cid: str) -> list[tuple[str, str | None]]:
    return [(r.status, r.stage) for r in replies_to(collector, cid)]


# ------------------------------------------------------------------------------------


def test_states_and_telemetry_reach_the_console(broker: Broker, console: Console) -> None:
    fleet = sim(broker, 5).start(online=["sim-0", "sim-1", "sim-2", "sim-3"])
    try:
        wait(lambda: len(console.devices()) == 4, "four retained states")
        views = console.devices()
        assert all(v.online and v.groups == ["lab"] for v in views.values())
        assert all(v.state and v.state.models[0].active == "1" for v in views.values())
        wait(lambda: fleet.sent_telemetry >= 20, "telemetry")
        # A device started later, one stopped: offline states are retained.
        fleet.start_device("sim-4")
        fleet.stop_device("sim-0")
        wait(lambda: console.view("sim-4").online, "sim-4 online")
        wait(lambda: not console.view("sim-0").online, "sim-0 offline")
        seen = console.view("sim-1").telemetry
        assert seen is not None and seen.seq >= 1 and seen.pipelines["cam"].fps > 0
    finally:
        fleet.stop()
    wait(lambda: all(not v.online for v in console.devices().values()), "all offline")
    # Every telemetry message the fleet counted reached the console, and no other.
    events: list[Event] = []

    def telemetry_seen() -> int:
        while not console.events.empty():
            events.append(console.events.get_nowait())
        return sum(isinstance(e, TelemetryEvent) for e in events)

    wait(lambda: telemetry_seen() >= fleet.sent_telemetry, "every telemetry message")
    assert telemetry_seen() == fleet.sent_telemetry
    assert not [e for e in events if isinstance(e, InvalidEvent)]


def test_ping_deploy_rollback_answer_in_order(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    fleet = sim(broker, 2).start()
    try:
        console.send("sim-1", PingCommand(id="ping-1"))
        assert final(replies, "ping-1").data is not None
        assert steps(replies, "ping-1") == [("accepted", None), ("done", None)]

        console.send("sim-1", deploy("dep-2", "2"))
        done = final(replies, "dep-2")
        assert steps(replies, "dep-2") == DEPLOY_STAGES
        assert done.data == {
            "model": "digits",
            "version": "2",
            "previous": "1",
            "pipelines": ["cam"],
        }
        wait(lambda: _active(console, "sim-1") == "2", "the new version in the retained state")
        state = console.view("sim-1").state
        assert state is not None and state.models[0].versions == ["1", "2"]

        # Stored and not active: a deploy does not bring it back; rollback does.
        console.send("sim-1", deploy("dep-1", "1"))
        assert final(replies, "dep-1").code is ReplyCode.DOWNGRADE
        console.send("sim-1", RollbackCommand(id="rb-1", model="digits"))
        back = final(replies, "rb-1")
        assert back.status == "done" and back.data == {
            "model": "digits",
            "version": "1",
            "previous": "2",
        }
        wait(lambda: _active(console, "sim-1") == "1", "the rollback in the retained state")

        console.send("sim-0", StatusCommand(id="st-1"))
        assert final(replies, "st-1").status == "done"
        assert fleet.active("sim-0") == "1"
    finally:
        fleet.stop()


def test_probation_lasts_its_own_time_and_the_other_stages_the_step_delay(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    fleet = sim(broker, 1, step_delay_s=0.05, probation_s=1.0).start()
    try:
        console.send("sim-0", deploy("dep-p", "2"))
        done = final(replies, "dep-p")
        assert steps(replies, "dep-p") == DEPLOY_STAGES
        at = {r.stage or r.status: r.ts for r in replies_to(replies, "dep-p")}
        assert done.ts - at["probation"] >= 1.0
        assert at["probation"] - at["swapping"] < 1.0
    finally:
        fleet.stop()


def test_a_repeated_command_id_is_answered_duplicate_and_not_run_again(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    fleet = sim(broker, 1).start()
    try:
        console.send("sim-0", deploy("dep-x", "2"))
        final(replies, "dep-x")
        console.send("sim-0", deploy("dep-x", "2"))
        wait(lambda: len(replies_to(replies, "dep-x")) == len(DEPLOY_STAGES) + 1, "the answer")
        again = replies_to(replies, "dep-x")[-1]
        assert (again.status, again.code) == ("failed", ReplyCode.DUPLICATE)
        assert again.data is not None and again.data["original"]["status"] == "done"
        assert fleet.runs("sim-0") == {"dep-x": 1}
        assert fleet.deploys("sim-0") == 1
    finally:
        fleet.stop()


def test_group_commands_failures_and_commands_held_while_offline(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    fleet = sim(broker, 3).start(online=["sim-0", "sim-1"])
    try:
        console.publish(console.topics.group_cmd("lab"), PingCommand(id="ping-g").to_bytes())
        wait(
            lambda: (
                {r.device for r in replies_to(replies, "ping-g") if r.status == "done"}
                == {"sim-0", "sim-1"}
            ),
            "both online members' answers",
        )
        # Offline: the command waits for the device, as its session would keep it.
        console.send("sim-2", PingCommand(id="ping-late"))
        time.sleep(0.2)
        assert replies_to(replies, "ping-late") == []
        fleet.start_device("sim-2")
        assert final(replies, "ping-late").status == "done"

        fleet.fail_deploys("sim-0", ReplyCode.PROBATION_FAILED, "flaky", times=1)
        console.send("sim-0", deploy("dep-f", "2"))
        failed = final(replies, "dep-f")
        assert (failed.status, failed.code, failed.message) == (
            "failed",
            ReplyCode.PROBATION_FAILED,
            "flaky",
        )
        assert [s for s in steps(replies, "dep-f")][:-1] == DEPLOY_STAGES[:-1]
        assert fleet.active("sim-0") == "1"
        # As the agent does: the version that failed probation is not deployed again.
        console.send("sim-0", deploy("dep-f2", "2"))
        assert final(replies, "dep-f2").code is ReplyCode.DOWNGRADE
        console.send("sim-1", deploy("dep-ok", "3"))
        assert final(replies, "dep-ok").status == "done"
    finally:
        fleet.stop()


class _Artifacts(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        if self.path != "/model.tflite":
            self.send_error(404)
            return
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_artifacts_are_fetched_when_asked(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Artifacts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    fleet = sim(broker, 1, fetch_artifacts=True, fetch_timeout_s=5.0).start()
    try:
        console.send("sim-0", deploy("dep-get", "2", f"{base}/model.tflite"))
        assert final(replies, "dep-get").status == "done"
        console.send("sim-0", deploy("dep-404", "3", f"{base}/missing.tflite"))
        assert final(replies, "dep-404").code is ReplyCode.DOWNLOAD_FAILED
        assert _Artifacts.hits == ["/model.tflite", "/missing.tflite"]
    finally:
        fleet.stop()
        server.shutdown()
        server.server_close()


def _active(console: Console, device: str) -> str | None:
    state: State | None = console.view(device).state
    return state.models[0].active if state and state.models else None


def test_a_device_changed_on_its_own_says_so_in_its_state(
    broker: Broker, console: Console, replies: MessageCollector
) -> None:
    fleet = sim(broker, 1).start()
    try:
        console.send("sim-0", deploy("dep-2", "2"))
        assert final(replies, "dep-2").status == "done"
        assert fleet.installed("sim-0") == ["digits 2"]
        fleet.roll_back_locally("sim-0", "1")
        fleet.set_groups("sim-0", ["lab", "kitchen"])
        wait(lambda: console.view("sim-0").groups == ["lab", "kitchen"], "the new groups")
        assert _active(console, "sim-0") == "1"
        with pytest.raises(ValueError, match="no digits 7"):
            fleet.roll_back_locally("sim-0", "7")
        # Brought forward again by a deploy of a new version, not of the stored one.
        console.send("sim-0", deploy("dep-3", "3"))
        assert final(replies, "dep-3").status == "done"
        assert fleet.installed("sim-0") == ["digits 2", "digits 3"]
    finally:
        fleet.stop()
