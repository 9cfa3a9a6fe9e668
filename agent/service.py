"""Wiring and lifecycle of the agent: builds the parts from config, starts and stops them
in order, handles signals, and talks to systemd. No business logic lives here.

Start order: pipelines (workers idle until a model arrives) -> model lifecycle
(store, start-up recovery, swaps) -> outbox -> command plane -> Home Assistant
discovery -> MQTT link -> local API. READY=1 goes to systemd once the first
connection has been attempted. Stop order is the reverse, so the current inference
finishes, the outbox is persisted and ``online: false`` is the last thing the broker
hears; the whole stop fits in systemd's stop timeout (a backstop ends the process if
a part overruns).

The main loop also supervises every thread (``agent.threads.Supervisor``): a dead one
is restarted or ends the process non-zero, and the watchdog is pinged only while no
thread and no pipeline is stuck.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.control import AgentControl
from agent.link.client import MqttLink
from agent.link.commands import CommandDispatcher
from agent.link.outbox import Outbox
from agent.link.transfer import ArtifactFetcher
from agent.live import LiveConfig
from agent.loops.capture import CaptureShelf, FrameCapture
from agent.loops.model_server import PipelineServer
from agent.loops.pipeline import Pipeline
from agent.models.lifecycle import ModelLifecycle
from agent.models.manifest import Manifest, input_shapes_beside
from agent.models.runtime import LoadedModel, LoaderError, Runtime, load_model, select_runtime
from agent.models.store import StoreError
from agent.ops import logs
from agent.ops.homeassistant import HomeAssistantDiscovery
from agent.ops.httpapi import HttpApi, Predictor
from agent.ops.metrics import INSTALL_HINT, MetricsExporter, metrics_available
from agent.ops.sdnotify import Notifier, watchdog_interval_s
from agent.ops.telemetry import DeviceSampler, TelemetryReporter
from agent.protocol import RuntimeInfo, State, Telemetry
from agent.threads import EXIT_THREAD_DIED, Supervisor, Watch

logger = logging.getLogger(__name__)

TICK_S = 0.5
# A pipeline whose worker or open source has made no progress for this long is hung.
# Under a systemd watchdog: two ping intervals (= WatchdogSec), at least 5 s.
HEARTBEAT_STALE_S = 20.0
# The MQTT thread also resolves and connects, which a slow resolver can hold up for a
# while (glibc: 5 s per try and server, both address families) without anything wrong.
LINK_STALE_S = 120.0
# How often the pipelines' drift windows are binned for the warning in state: a few
# hundred microseconds each, so the warning follows the window within about a second.
DRIFT_CHECK_S = 1.0
# SIGTERM to exit: systemd kills at TimeoutStopSec=15. The parts of a stop share
# STOP_BUDGET_S (each has its own cap, below); past STOP_BACKSTOP_S after the signal
# the process ends anyway, with EXIT_STOP_OVERRAN.
STOP_BUDGET_S = 8.0
STOP_BACKSTOP_S = 9.0
EXIT_STOP_OVERRAN = 71
_STOP_CAPS_S = {"commands": 2.5, "pipelines": 1.5, "outbox": 2.5, "link": 1.0, "http": 0.5}


class Agent:
    """The running agent. ``run()`` blocks until SIGTERM/SIGINT; ``start``/``stop`` for tests."""

    def __init__(self, live: LiveConfig, notifier: Notifier | None = None) -> None:
        self.live = live
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self._reload = threading.Event()
        self.started_at = time.time()
        self.runtime: Runtime | None = None
        self.pipelines: dict[str, Pipeline] = {}
        self._built = False
        self.stale_after_s = HEARTBEAT_STALE_S
        self._next_telemetry = float("inf")
        self.supervisor = Supervisor(HEARTBEAT_STALE_S)
        self.telemetry_errors = 0
        self._stop_requested_at: float | None = None

    @property
    def config(self) -> AgentConfig:
        return self.live.current

    # ----------------------------------------------------------------- building

    def _load(self, path: Path) -> LoadedModel:
        if self.runtime is None:
            raise LoaderError("no TFLite runtime available")
        rc = self.config.runtime
        return load_model(
            path,
            runtime=self.runtime,
            num_threads=rc.num_threads,
            delegate=rc.delegate,
            delegate_path=rc.delegate_path,
            delegate_options=rc.delegate_options,
            # A .tflite with dynamic input dims runs at the shape its manifest records.
            input_shapes=input_shapes_beside(path),
        )

    def _manifest(self, name: str, version: str) -> Manifest | None:
        try:
            return self.lifecycle.store.get(name, version).manifest
        except StoreError:
            return None

    def build(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.runtime = select_runtime(config.runtime.prefer)
            logger.info("runtime %s", self.runtime)
        except LoaderError as exc:
            logger.error("%s; pipelines run without models", exc)
        self.link = MqttLink(config)
        self.outbox = Outbox(config, self.link)
        for pc in config.pipelines:
            self.pipelines[pc.name] = Pipeline(
                pc,
                device=config.device.id,
                manifests=self._manifest,
                publish=self.outbox.enqueue_result,
                load=self._load,
                captures=FrameCapture(pc.name, pc.capture, config.state_dir / "captures" / pc.name)
                if pc.capture.enabled
                else None,
            )
        self.lifecycle = ModelLifecycle.from_config(
            config,
            [PipelineServer(p, self._load, self._manifest) for p in self.pipelines.values()],
            on_change=self._state_changed,
        )
        self.control = AgentControl(
            self.lifecycle, self.pipelines, self.live, status_extra=self._status_extra
        )
        self.fetcher = ArtifactFetcher(config, self.link)
        self.dispatcher = CommandDispatcher(
            config, self.link, self.control, self.fetcher, state_changed=self._state_changed
        )
        self.link.set_state_provider(self.state)
        self.home_assistant = HomeAssistantDiscovery(
            config, self.link, self.dispatcher.submit, __version__
        )
        self.telemetry = TelemetryReporter(
            config.device.id,
            DeviceSampler(config.state_dir),
            lambda now: {n: p.telemetry(now) for n, p in self.pipelines.items()},
            self.outbox.stats,
        )
        self.http: HttpApi | None = None
        if config.http.enabled:
            metrics = self._metrics() if config.http.metrics else None
            captures = {n: p.captures for n, p in self.pipelines.items() if p.captures}
            self.http = HttpApi(
                config.http.bind,
                config.http.port,
                Predictor(self, self._load),
                metrics,
                CaptureShelf(captures),
            )
        self.live.subscribe(self._apply_live)
        self._watch_threads()
        self._built = True

    def _watch_threads(self) -> None:
        # Restarted in place: loops whose state lives in their component (queues,
        # counters, the served model). Fatal: the outbox's thread owns its database
        # connection and in-flight bookkeeping, the link's the paho loop; a new process
        # rebuilds both from disk and the broker's session.
        sup = self.supervisor
        d = self.dispatcher
        sup.watch(
            Watch("commands", d.thread, lambda: d.heartbeat, d.restart_thread),
            Watch("mqtt-link", self.link.thread, lambda: self.link.heartbeat, None, LINK_STALE_S),
            Watch("outbox", self.outbox.thread, lambda: self.outbox.heartbeat),
        )
        # A lane may run one command for minutes (a download): no heartbeat, only death.
        sup.watch(*(Watch(lane.name, lane.thread, None, lane.restart) for lane in d.lanes))
        for p in self.pipelines.values():
            sup.watch(*p.watches())
        if self.http is not None:
            http = self.http
            sup.watch(Watch("http-api", http.thread, http.heartbeat, http.restart_thread))

    def _metrics(self) -> MetricsExporter:
        if not metrics_available():
            logger.error("%s; GET /metrics will answer 503", INSTALL_HINT)
        # Its own sampler and fps readers: a scrape must not reset telemetry's windows.
        reporter = TelemetryReporter(
            self.config.device.id,
            DeviceSampler(self.config.state_dir),
            lambda now: {n: p.telemetry(now, "metrics") for n, p in self.pipelines.items()},
            self.outbox.stats,
        )
        return MetricsExporter(
            lambda: reporter.build().model_copy(update=self.thread_report()), self.outbox.stats
        )

    # --------------------------------------------------------------- start, stop

    def start(self, connect_wait_s: float = 5.0) -> None:
        if not self._built:
            self.build()
        self.supervisor.install()
        for p in self.pipelines.values():
            p.start()
        self.lifecycle.start()
        self.outbox.start()
        self.dispatcher.start()
        self.home_assistant.start()
        self.link.start()
        if self.http is not None:
            self.http.start()
        # READY means the first connection was attempted, not that it succeeded: a
        # device must come up (and serve its models) while the broker is away.
        deadline = time.monotonic() + connect_wait_s
        while time.monotonic() < deadline and not self.link.connected and not self.link.last_error:
            self.stop_event.wait(0.05)
        self.notifier.ready(self.status_line())
        logger.info("edge-agent %s started: %s", __version__, self.status_line())

    def stop(self) -> None:
        """Stop every part within STOP_BUDGET_S, in an order that loses nothing: the
        running command ends (the fetcher aborts its download) and its last reply goes
        out while the link is up; pipelines hand their last results to the outbox, which
        persists them; the link says ``online: false`` last."""
        self.notifier.stopping()
        logger.info("stopping")
        deadline = time.monotonic() + STOP_BUDGET_S

        def budget(part: str) -> float:
            return max(0.1, min(_STOP_CAPS_S[part], deadline - time.monotonic()))

        self.lifecycle.stop()
        self.fetcher.stop()
        self.dispatcher.stop(budget("commands"))
        pipelines_by = time.monotonic() + budget("pipelines")
        for p in self.pipelines.values():
            p.stop(max(0.1, pipelines_by - time.monotonic()))
        self.outbox.stop(budget("outbox"))
        self.link.stop(budget("link"))
        self.home_assistant.stop()
        if self.http is not None:
            self.http.stop(budget("http"))
        self.supervisor.uninstall()
        logger.info("stopped")

    def run(self) -> int:
        """Run until SIGTERM or SIGINT (0), or until a thread that cannot be restarted
        dies (EXIT_THREAD_DIED); SIGHUP reloads the config."""

        def on_stop(signum: int, frame: FrameType | None) -> None:
            if self._stop_requested_at is None:
                self._stop_requested_at = time.monotonic()
            self.stop_event.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.start()
        code = 1
        try:
            code = self.serve(watchdog_interval_s())
        finally:
            started = self._stop_requested_at or time.monotonic()
            arm_backstop(started + STOP_BACKSTOP_S)
            self.stop()
        return code

    def serve(self, watchdog_s: float | None = None) -> int:
        """The main loop of a started agent: supervision, watchdog, reloads, telemetry.
        Returns 0 once ``stop_event`` is set, EXIT_THREAD_DIED when a thread that cannot
        be restarted died (the caller then stops the agent)."""
        if watchdog_s is not None:
            self.stale_after_s = max(2 * watchdog_s, 5.0)
        self.supervisor.stale_after_s = self.stale_after_s
        next_watchdog = 0.0
        self._next_telemetry = time.monotonic() + self.config.telemetry.interval_s
        reported = self.thread_report()
        next_drift_check = 0.0
        drift_warnings = self.drift_warnings()
        while not self.stop_event.wait(TICK_S):
            now = time.monotonic()
            for p in self.pipelines.values():
                p.poll()
            health = self.supervisor.check()
            if health.fatal is not None:
                logger.critical("ending the process: thread %s is dead", health.fatal)
                return EXIT_THREAD_DIED
            if self.thread_report() != reported:
                reported = self.thread_report()
                self._state_changed()  # the retained state tells the fleet at once
            if now >= next_drift_check:
                next_drift_check = now + DRIFT_CHECK_S
                for p in self.pipelines.values():
                    p.check_drift()
            # Telemetry and scrapes bin the windows too: compare whoever changed them.
            if self.drift_warnings() != drift_warnings:
                drift_warnings = self.drift_warnings()
                self._state_changed()
            if self._reload.is_set():
                self._reload.clear()
                self.notifier.reloading()
                self.live.reload()
                self._state_changed()
                self.notifier.ready(self.status_line())
            if watchdog_s is not None and now >= next_watchdog:
                hung = self.hung_pipelines()
                if hung:
                    logger.error("not pinging the watchdog: hung pipeline(s) %s", hung)
                elif not health.ok:
                    logger.error("not pinging the watchdog: thread(s) down %s", health.stuck)
                else:
                    self.notifier.watchdog()
                    self.notifier.status(self.status_line())
                next_watchdog = now + watchdog_s
            if now >= self._next_telemetry:
                self._next_telemetry = now + self.config.telemetry.interval_s
                self._send_telemetry()
        return 0

    def _send_telemetry(self) -> None:
        try:
            message = self.build_telemetry()
        except Exception:
            # The main loop also pets the watchdog: a bad figure must not end it.
            self.telemetry_errors += 1
            logger.exception("cannot build telemetry (%d failures)", self.telemetry_errors)
            return
        self.outbox.enqueue_telemetry(message)

    def build_telemetry(self) -> Telemetry:
        threads = self.thread_report()
        return self.telemetry.build().model_copy(update=threads)

    # ----------------------------------------------------------------- reporting

    def thread_report(self) -> dict[str, Any]:
        """``thread_deaths`` and ``threads_down`` as State and Telemetry carry them."""
        health = self.supervisor.health
        return {
            "thread_deaths": self.supervisor.deaths,
            "threads_down": sorted({*health.dead, *health.stuck}),
        }

    def drift_warnings(self) -> dict[str, str | None]:
        return {n: p.drift.warning for n, p in self.pipelines.items()}

    def hung_pipelines(self) -> list[str]:
        now = time.monotonic()
        return [n for n, p in self.pipelines.items() if p.heartbeat_age(now) > self.stale_after_s]

    def status_line(self) -> str:
        link = "connected" if self.link.connected else "broker unreachable"
        parts = [f"{p.name}={p.state().status}" for p in self.pipelines.values()]
        return f"{link}; pipelines: {', '.join(parts) or 'none'}"

    def state(self) -> State:
        config = self.config
        return State(
            device=config.device.id,
            online=True,
            agent_version=__version__,
            runtime=RuntimeInfo(name=self.runtime.name, version=self.runtime.version)
            if self.runtime
            else None,
            models=self.lifecycle.model_states(),
            pipelines=[p.state() for p in self.pipelines.values()],
            groups=list(config.device.groups),
            restart_needed=list(self.live.restart_needed),
            warnings=list(self.live.warnings),
            **self.thread_report(),
            since=self.started_at,
            ts=time.time(),
        )

    def _state_changed(self) -> None:
        if self.link.connected:
            self.link.publish_state()

    def _status_extra(self) -> dict[str, Any]:
        return {"link": self.link.status(), "outbox": self.outbox.stats()}

    def _apply_live(self, config: AgentConfig) -> None:
        logging.getLogger().setLevel(logs.effective_level(config.log_level))
        # A shorter telemetry interval takes effect now, not after the old one ends.
        soon = time.monotonic() + config.telemetry.interval_s
        self._next_telemetry = min(self._next_telemetry, soon)
        for pc in config.pipelines:
            if pc.name in self.pipelines:
                self.pipelines[pc.name].update(pc)
        self._state_changed()

    # ------------------------------------------------ ModelCatalog (local API)

    def active(self, name: str) -> tuple[str, Path] | None:
        record = self.lifecycle.store.record(name)
        if record.active is None:
            return None
        try:
            stored = self.lifecycle.store.get(name, record.active)
        except StoreError:
            return None
        return record.active, stored.model_path

    def health(self) -> tuple[bool, dict[str, Any]]:
        states = {n: p.state().status for n, p in self.pipelines.items()}
        hung = self.hung_pipelines()
        threads = self.thread_report()
        ok = (
            not hung
            and not threads["threads_down"]
            and all(s == "running" for s in states.values())
        )
        return ok, {
            "pipelines": states,
            "hung": hung,
            "connected": self.link.connected,
            **threads,
        }


def arm_backstop(at: float, code: int = EXIT_STOP_OVERRAN) -> threading.Thread:
    """End the process at monotonic time ``at`` if it has not ended by then: a part that
    ignores its stop deadline (or a non-daemon thread the interpreter waits for at exit)
    must not run into systemd's SIGKILL, which would skip the log lines saying why."""

    def wait_then_exit() -> None:
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        running = sorted(
            t.name for t in threading.enumerate() if t is not threading.current_thread()
        )
        logger.critical(
            "stop did not finish within %.0f s of the signal; exiting %d. Still running: %s",
            STOP_BACKSTOP_S,
            code,
            ", ".join(running),
        )
        exit_now(code)

    thread = threading.Thread(target=wait_then_exit, name="stop-backstop", daemon=True)
    thread.start()
    return thread


def run_agent(config_path: Path) -> int:
    live = LiveConfig.load(config_path, announce=False)
    logs.setup_logging(live.current.log_level, live.current.log_format)
    live.announce()
    code = Agent(live).run()
    # Everything is persisted and closed by now. The interpreter's own teardown runs
    # native finalisers (TFLite interpreters, OpenCV) after daemon threads stop, where
    # the backstop cannot end a hang; so the process ends here, not in Py_Finalize.
    exit_now(code)
    return code  # not reached


def exit_now(code: int) -> None:
    """End the process at once with ``code``, after flushing the logs."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
