"""Every agent thread is supervised: a thread killed by an exception its loop does not
catch is restarted (commands, worker, capture, results, captures, HTTP) or ends the agent with a
non-zero status (outbox, MQTT link), and either way it is logged and counted.

A real agent in this process: a real broker, a real converter-built model on a real
runtime, a synthetic camera. ``serve()`` (the main loop without the signal handlers)
runs on a thread of the test's own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.live import LiveConfig
from agent.loops.pipeline import Pipeline
from agent.models.manifest import read_bundle
from agent.models.store import ModelStore
from agent.service import Agent
from agent.threads import EXIT_THREAD_DIED, Supervisor, Watch
from tests.converter_support import build_digits_bundle
from tests.link_support import make_config
from tests.mqtt_support import Broker, MessageCollector, free_port, publish

DEVICE = "pi-supervised"
PREFIX = "supervise-test"


class ThreadKill(BaseException):
    """Raised past every ``except Exception`` in a loop: it ends the thread."""


def raise_once(real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    fired: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            raise exc
        return real(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_bundle(tmp_path_factory.mktemp("bundle") / "digits-1", "1")


@contextmanager
def serving_agent(tmp_path: Path, broker: Broker, bundle: Path) -> Iterator[Served]:
    data = read_bundle(bundle)
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(data.manifest_data, None, data.model_path)
    store.set_active("digits", "1")
    config = {
        "device": {"id": DEVICE},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
        "models": {"require_signature": False},
        "http": {"enabled": True, "port": free_port()},
        "pipelines": [
            {"name": "cam", "model": "digits", "queue": "fifo",
             "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                        "channels": 1, "fps": 50},
             "capture": {"enabled": True, "below": 0.995, "max_frames": 1000,
                         "min_interval_s": 0}},
        ],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = Agent(LiveConfig.load(path))
    agent.start()
    served = Served(agent, broker)
    try:
        yield served
    finally:
        agent.stop_event.set()
        served.thread.join(10)
        agent.stop()
        served.replies.close()


class Served:
    def __init__(self, agent: Agent, broker: Broker) -> None:
        self.agent = agent
        self.code: int | None = None
        self.replies = MessageCollector(broker, f"{PREFIX}/{DEVICE}/reply")
        self.broker = broker
        self.thread = threading.Thread(target=self._serve, name="test-serve", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.code = self.agent.serve()

    def ping(self, timeout: float = 20.0) -> bool:
        """True when a ping sent now gets its ``done`` reply."""
        command_id = f"ping-{uuid.uuid4().hex[:8]}"
        payload = json.dumps({"id": command_id, "op": "ping"}).encode()
        publish(self.broker, f"{PREFIX}/{DEVICE}/cmd", payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.replies.messages):
                reply = json.loads(m.payload)
                if reply["id"] == command_id and reply["status"] == "done":
                    return True
            time.sleep(0.05)
        return False

    def results_grow(self, timeout: float = 30.0) -> bool:
        pipeline = self.agent.pipelines["cam"]
        mark = pipeline.results_out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pipeline.results_out >= mark + 10:
                return True
            time.sleep(0.05)
        return False

    def healthz(self) -> int:
        assert self.agent.http is not None
        url = f"http://127.0.0.1:{self.agent.http.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def kill_commands(s: Served) -> None:
    d = s.agent.dispatcher
    d._handle = raise_once(d._handle, ThreadKill("commands"))  # type: ignore[method-assign]
    s.ping(timeout=2)  # the message that ends the thread; not answered


def kill_worker(s: Served) -> None:
    w = s.agent.pipelines["cam"].worker
    w._switch_pending = raise_once(w._switch_pending, ThreadKill("worker"))  # type: ignore[method-assign]


def kill_capture(s: Served) -> None:
    source = s.agent.pipelines["cam"].source
    source.read = raise_once(source.read, ThreadKill("capture"))  # type: ignore[method-assign]


def kill_results(s: Served) -> None:
    p = s.agent.pipelines["cam"]
    p._on_result = raise_once(p._on_result, ThreadKill("results"))  # type: ignore[method-assign]


def kill_captures(s: Served) -> None:
    c = s.agent.pipelines["cam"].captures
    assert c is not None
    c._take = raise_once(c._take, ThreadKill("captures"))  # type: ignore[method-assign]


def kill_http(s: Served) -> None:
    assert s.agent.http is not None
    server = s.agent.http._server
    server.service_actions = raise_once(server.service_actions, ThreadKill("http"))  # type: ignore[method-assign]


def works_commands(s: Served) -> bool:
    return s.ping()


def works_pipeline(s: Served) -> bool:
    return s.results_grow()


def works_captures(s: Served) -> bool:
    """A frame is kept (the digits model is unsure of a few of every 200)."""
    c = s.agent.pipelines["cam"].captures
    assert c is not None
    mark = c.written
    deadline = time.monotonic() + 30
    while c.written == mark:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def works_http(s: Served) -> bool:
    return s.healthz() == 200


RESTARTED = {
    "commands": (kill_commands, works_commands),
    "worker-cam": (kill_worker, works_pipeline),
    "capture-cam": (kill_capture, works_pipeline),
    "results-cam": (kill_results, works_pipeline),
    "captures-cam": (kill_captures, works_captures),
    "http-api": (kill_http, works_http),
}


@pytest.mark.parametrize("name", sorted(RESTARTED))
def test_a_killed_thread_is_restarted_logged_and_counted(
    name: str, tmp_path: Path, broker: Broker, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kill, works = RESTARTED[name]
    caplog.set_level(logging.ERROR, logger="agent.threads")
    with serving_agent(tmp_path, broker, bundle) as s:
        agent = s.agent
        wait_for(lambda: agent.pipelines["cam"].results_out > 0, 60, "first results")
        assert works(s), f"{name}: not working before the kill"
        before = agent.supervisor.threads()[name]
        assert before is not None and before.is_alive()
        kill(s)
        wait_for(lambda: agent.supervisor.deaths == 1, 30, f"the death of {name}")

        def replaced() -> bool:
            now = agent.supervisor.threads()[name]
            return now is not None and now is not before and now.is_alive()

        wait_for(replaced, 10, "a new thread")
        assert not before.is_alive()
        assert works(s), f"{name}: not working after the restart"
        # Logged with the traceback, counted in state and telemetry, and the agent serves on.
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"thread {name} died; restarting it" in logged
        assert f"ThreadKill: {name.split('-')[0]}" in logged
        assert agent.state().thread_deaths == 1
        assert agent.build_telemetry().thread_deaths == 1
        assert agent.state().threads_down == []
        assert s.thread.is_alive() and s.code is None


def kill_outbox(s: Served) -> None:
    o = s.agent.outbox
    o._take_intake = raise_once(o._take_intake, ThreadKill("outbox"))  # type: ignore[method-assign]


def kill_link(s: Served) -> None:
    loop = s.agent.link._loop
    assert loop is not None
    loop.once = raise_once(loop.once, RuntimeError("a paho bug"))  # type: ignore[method-assign]


@pytest.mark.parametrize(("name", "kill"), [("outbox", kill_outbox), ("mqtt-link", kill_link)])
def test_a_killed_thread_that_cannot_restart_ends_the_agent_non_zero(
    name: str,
    kill: Callable[[Served], None],
    tmp_path: Path,
    broker: Broker,
    bundle: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="agent")
    with serving_agent(tmp_path, broker, bundle) as s:
        wait_for(lambda: s.agent.link.connected, 30, "the link")
        kill(s)
        s.thread.join(30)
        assert not s.thread.is_alive(), "serve() went on with a dead thread"
        assert s.code == EXIT_THREAD_DIED
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"thread {name} died and it cannot be restarted" in logged
        assert s.agent.supervisor.deaths == 1
        assert s.agent.state().threads_down == [name]


# ---------------------------------------------------------- restarting a hung source


def test_restarting_a_hung_source_leaves_one_capture_thread(tmp_path: Path) -> None:
    """A sensor replayed from a FIFO: when the writer goes quiet the read blocks, as a
    hung driver's does. A restart must not start a second reader on the same source;
    the new one starts once the old read returns."""
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    config = make_config(
        tmp_path / "state",
        pipelines=[{"name": "vib-restart", "model": "anomaly", "queue": "latest",
                    "source": {"type": "sensor", "input": "file", "path": str(fifo),
                               "window": 2}}],
    )  # fmt: skip
    pipeline = Pipeline(
        config.pipelines[0],
        device="pi-1",
        manifests=lambda name, version: None,
        publish=lambda result: None,
        load=lambda path: None,  # type: ignore[arg-type,return-value]
    )
    supervisor = Supervisor(stale_after_s=3600)
    supervisor.watch(*pipeline.watches())
    pipeline.start()
    writer = os.open(fifo, os.O_WRONLY)  # returns once the capture thread opened it
    try:
        os.write(writer, b"".join(b"%d,%d\n" % (i, i) for i in range(6)))
        wait_for(lambda: pipeline.capture.frames >= 3, 20, "frames from the sensor")
        [hung] = alive_named("capture-vib-restart")
        pipeline.restart_source()  # the old thread is stuck in its read: it stays
        assert alive_named("capture-vib-restart") == [hung]
        pipeline.poll()
        assert alive_named("capture-vib-restart") == [hung]
        assert supervisor.check().ok and supervisor.deaths == 0
        # The read returns, the old thread sees its stop and ends; the new one takes over.
        os.write(writer, b"6,6\n7,7\n")
        wait_for(lambda: not hung.is_alive(), 20, "the hung reader to end")
        pipeline.poll()
        wait_for(lambda: pipeline.capture.state == "open", 20, "the new reader")
        [new] = alive_named("capture-vib-restart")
        assert new is not hung
        os.write(writer, b"".join(b"%d,%d\n" % (i, i) for i in range(8, 14)))
        wait_for(lambda: pipeline.capture.frames >= 1, 20, "frames from the new reader")
        assert len(alive_named("capture-vib-restart")) == 1
        assert supervisor.check().ok and supervisor.deaths == 0
    finally:
        pipeline.stop(2.0)
        os.close(writer)


# ------------------------------------------------------------- status and telemetry


def test_the_status_command_leaves_the_telemetry_fps_window_alone(
    tmp_path: Path, broker: Broker
) -> None:
    config = make_config(
        tmp_path / "state",
        broker,
        pipelines=[{"name": "cam", "model": "digits",
                    "source": {"type": "synthetic", "width": 8, "height": 8}}],
    )  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    agent = Agent(LiveConfig.load(path))
    agent.build()  # built, not started: the counters are the test's to set
    agent.lifecycle.store.open()
    pipeline = agent.pipelines["cam"]
    start = time.monotonic()
    assert pipeline.telemetry(start).fps == 0.0  # telemetry's window opens here
    pipeline.results_out = 100
    status = agent.control.status()
    assert "cam" in status["pipelines"]
    # 100 results in 10 s since telemetry last read: the status read in between
    # (on its own window) does not restart telemetry's.
    assert pipeline.telemetry(start + 10).fps == 10.0


# ------------------------------------------------------------- the supervisor alone


class Looping:
    """A component with one loop thread that a test can kill, stall and restart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.heartbeat = time.monotonic()
        self.stall = threading.Event()
        self.kill = threading.Event()
        self.stop = threading.Event()
        self.started = 0
        self.thread_: threading.Thread | None = None
        self.restart()

    def restart(self) -> None:
        self.started += 1
        self.thread_ = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread_.start()

    def thread(self) -> threading.Thread | None:
        return None if self.stop.is_set() else self.thread_

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            if self.kill.is_set():
                self.kill.clear()
                raise ThreadKill(self.name)
            if not self.stall.is_set():
                self.heartbeat = time.monotonic()


def test_a_thread_that_keeps_dying_is_restarted_a_few_times_then_ends_the_agent() -> None:
    loop = Looping("flaky")
    sup = Supervisor(stale_after_s=60, max_restarts=2)
    sup.watch(Watch("flaky", loop.thread, lambda: loop.heartbeat, loop.restart))
    sup.install()
    try:
        for deaths in (1, 2, 3):
            dying = loop.thread_
            assert dying is not None
            loop.kill.set()
            dying.join(10)
            health = sup.check()
            assert sup.deaths == deaths
            if deaths <= 2:
                assert health.ok and loop.started == deaths + 1
        assert health.fatal == "flaky" and health.dead == ["flaky"]
        assert loop.started == 3  # not restarted a third time
    finally:
        loop.stop.set()
        sup.uninstall()


def test_a_stall_is_reported_once_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    loop = Looping("staller")
    sup = Supervisor(stale_after_s=0.5)
    sup.watch(Watch("staller", loop.thread, lambda: loop.heartbeat))
    try:
        assert sup.check().ok
        loop.stall.set()
        wait_for(lambda: sup.check().stuck == ["staller"], 10, "the stall")
        assert sup.check().stuck == ["staller"]
        assert sup.stalls == 1
        assert "in _run" in caplog.text  # the report shows where the thread is
        loop.stall.clear()
        wait_for(lambda: sup.check().ok, 10, "progress again")
        assert sup.stalls == 1 and sup.deaths == 0
        # Stopped on purpose: not a death.
        loop.stop.set()
        assert loop.thread_ is not None
        loop.thread_.join(10)
        assert sup.check().ok and sup.deaths == 0
    finally:
        loop.stop.set()


def test_the_hook_keeps_watched_tracebacks_and_passes_on_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.thread.name if args.thread else "")
    sup = Supervisor(stale_after_s=60)
    loop = Looping("watched")
    sup.watch(Watch("watched", loop.thread))
    sup.install()
    try:

        def fail() -> None:
            raise ValueError("not watched")

        other = threading.Thread(target=fail, name="someone-else")
        other.start()
        other.join()
        loop.kill.set()
        assert loop.thread_ is not None
        loop.thread_.join(10)
        health = sup.check()
        assert health.fatal == "watched"
        assert "ThreadKill: watched" in caplog.text  # logged by the supervisor, with it
        assert seen == ["someone-else"]
    finally:
        loop.stop.set()
        sup.uninstall()
        threading.excepthook = previous
