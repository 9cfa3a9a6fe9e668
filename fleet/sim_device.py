"""One simulated device of ``fleet.sim``: its state, its telemetry, and how it runs commands.

``CommandRunner`` answers commands as the real agent does (``agent/link/commands.py``
and the model lifecycle): ``accepted`` at once; ping and status done at once; deploy
and restart one at a time on one lane, rollback and config on another; a deploy
reports the stages downloading (receiving for chunks), installing, validating,
swapping, probation, publishes the new retained state, then ``done``; a version
stored and not active (or one that failed probation here) is refused with
``downgrade``; a command id seen before is answered ``duplicate`` with how it ended
and never run again. Long commands are generators of delays, so a connection's one
worker runs thousands of them without a thread each. Everything here runs on that
worker; what it sends goes through the ``Output`` it was given.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.models.manifest import BundleError, parse_manifest
from agent.protocol import (
    Command,
    CommandFailed,
    ConfigCommand,
    DeployCommand,
    ModelState,
    MqttArtifact,
    PingCommand,
    PipelineState,
    PipelineTelemetry,
    ProtocolError,
    Reply,
    ReplyCode,
    RestartCommand,
    RollbackCommand,
    RuntimeInfo,
    StageLatency,
    State,
    StatusCommand,
    Telemetry,
    command_id_of,
    decode_command,
)

log = logging.getLogger(__name__)

AGENT_VERSION = "sim-1"
# Commands kept for a stopped device, as a broker session would (bounded).
MAX_HELD_COMMANDS = 100
LONG_OPS = {"deploy": "work", "restart": "work", "rollback": "control", "config": "control"}
# A step of a long command: the delay before the next one, or None when it ended.
Steps = Iterator[float]


@dataclass
class DeviceSim:
    """One simulated device; only its connection's worker changes it."""

    id: str
    groups: list[str]
    pipeline: str
    models: dict[str, ModelState]
    since: float = field(default_factory=time.time)
    online: bool = False
    seq: int = 0
    generation: int = 0  # bumped at every start/stop: ends the old telemetry timer
    sent_telemetry: int = 0
    # Command id -> its final reply (None while it runs): answers a repeated id.
    outcomes: dict[str, Reply | None] = field(default_factory=dict)
    runs: Counter[str] = field(default_factory=Counter)  # command id -> times executed
    deploys: int = 0
    installed: list[str] = field(default_factory=list)  # "model version", per install
    previous: dict[str, str] = field(default_factory=dict)  # model -> version before
    failed_versions: set[tuple[str, str]] = field(default_factory=set)
    lanes: dict[str, deque[Steps]] = field(default_factory=dict)
    held: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_HELD_COMMANDS))
    # (code, message, times left or None for always) for the next deploys.
    fail_deploy: tuple[ReplyCode, str, int | None] | None = None

    def state(self) -> State:
        model = next(iter(self.models), None)
        return State(
            device=self.id,
            online=self.online,
            agent_version=AGENT_VERSION,
            runtime=RuntimeInfo(name="simulated", version="0"),
            models=list(self.models.values()),
            pipelines=[PipelineState(name=self.pipeline, model=model, status="running")],
            groups=self.groups,
            since=self.since,
            ts=time.time(),
        )


class Output(Protocol):
    """What a device's commands send through: its connection."""

    def reply(
        self, dev: DeviceSim, cid: str, status: str, code: ReplyCode, final: bool = False, **kw: Any
    ) -> None: ...

    def publish_state(self, dev: DeviceSim) -> None: ...

    def after(self, delay: float, task: Callable[[], float | None]) -> None: ...


class CommandRunner:
    """Runs the commands of the devices of one connection; see the module docstring."""

    def __init__(
        self,
        out: Output,
        *,
        step_delay_s: float,
        fetch_artifacts: bool,
        fetch_timeout_s: float,
        probation_s: float | None = None,
    ) -> None:
        self.out = out
        self.step_delay_s = step_delay_s
        self.probation_s = step_delay_s if probation_s is None else probation_s
        self.fetch_artifacts = fetch_artifacts
        self.fetch_timeout_s = fetch_timeout_s

    def handle(self, dev: DeviceSim, payload: bytes) -> None:
        """One command payload for an online device, on its connection's worker."""
        try:
            command = decode_command(payload)
        except ProtocolError as err:
            cid = command_id_of(payload)
            if cid:  # no usable id: nobody could match an answer
                self.out.reply(dev, cid, "failed", err.code, message=err.message)
            return
        if command.expires_at is not None and command.expires_at < time.time():
            self.out.reply(dev, command.id, "failed", ReplyCode.EXPIRED, message="expired")
            return
        if command.id in dev.outcomes:
            first = dev.outcomes[command.id]
            original = (
                {"status": first.status, "code": first.code.value, "message": first.message}
                | ({"data": first.data} if first.data is not None else {})
                if first is not None
                else {"status": "accepted", "code": "accepted", "message": command.op}
            )
            message = "this command id was seen before; not executed again"
            self.out.reply(
                dev, command.id, "failed", ReplyCode.DUPLICATE, message=message,
                data={"original": original},
            )  # fmt: skip
            return
        dev.outcomes[command.id] = None
        dev.runs[command.id] += 1
        self.out.reply(dev, command.id, "accepted", ReplyCode.ACCEPTED, message=command.op)
        if isinstance(command, PingCommand):
            self._finish(dev, command.id, {"pong": True, "ts": time.time()})
        elif isinstance(command, StatusCommand):
            models = [m.model_dump(mode="json", exclude_none=True) for m in dev.models.values()]
            self._finish(dev, command.id, {"simulated": True, "models": models})
        else:
            lane = dev.lanes.setdefault(LONG_OPS[command.op], deque())
            lane.append(self._steps(dev, command))
            if len(lane) == 1:
                self.out.after(0.0, lambda: self._advance(lane))

    def _advance(self, lane: deque[Steps]) -> float | None:
        """One step of the lane's first command; the next command starts when it ends."""
        try:
            return next(lane[0])
        except StopIteration:
            lane.popleft()
            return 0.0 if lane else None

    def _finish(self, dev: DeviceSim, cid: str, data: dict[str, Any]) -> None:
        self.out.reply(dev, cid, "done", ReplyCode.OK, final=True, data=data)

    def _steps(self, dev: DeviceSim, command: Command) -> Steps:
        delay = self.step_delay_s
        try:
            if isinstance(command, DeployCommand):
                yield from self._deploy(dev, command, delay)
            elif isinstance(command, RollbackCommand):
                yield delay
                data = self._rollback(dev, command)
                self.out.publish_state(dev)
                self._finish(dev, command.id, data)
            elif isinstance(command, ConfigCommand):
                yield delay
                self._finish(dev, command.id, {"applied": sorted(command.changes)})
            elif isinstance(command, RestartCommand):
                yield delay
                self._finish(dev, command.id, {"restarted": [command.pipeline or dev.pipeline]})
        except CommandFailed as exc:
            self.out.reply(
                dev, command.id, "failed", exc.code, final=True, message=exc.message,
                data=exc.data,
            )  # fmt: skip
        except Exception as exc:  # a bug here must still end the command, and the lane go on
            log.exception("simulated %s failed", command.op)
            self.out.reply(
                dev, command.id, "failed", ReplyCode.INTERNAL, final=True,
                message=f"internal error: {type(exc).__name__}",
            )  # fmt: skip

    def _progress(self, dev: DeviceSim, cid: str, stage: str, percent: float | None = None) -> None:
        self.out.reply(
            dev, cid, "progress", ReplyCode.IN_PROGRESS, message=stage, stage=stage,
            percent=percent,
        )  # fmt: skip

    def _deploy(self, dev: DeviceSim, command: DeployCommand, delay: float) -> Steps:
        cid = command.id
        dev.deploys += 1
        try:
            manifest = parse_manifest(command.manifest)
        except BundleError as exc:
            raise CommandFailed(ReplyCode.BAD_MANIFEST, str(exc)) from None
        name, version = manifest.name, manifest.version
        art = command.artifact
        stage = "receiving" if isinstance(art, MqttArtifact) else "downloading"
        self._progress(dev, cid, stage, 0.0)
        yield delay
        if self.fetch_artifacts and not isinstance(art, MqttArtifact):
            fetch(art.url, self.fetch_timeout_s)
        self._progress(dev, cid, stage, 100.0)
        yield delay
        self._progress(dev, cid, "installing")
        yield delay
        old = dev.models.get(name)
        previous = old.active if old else None
        if version == previous:
            self._finish(dev, cid, {"model": name, "version": version, "previous": previous,
                                    "unchanged": True})  # fmt: skip
            return
        if (old is not None and version in old.versions) or (name, version) in dev.failed_versions:
            raise CommandFailed(
                ReplyCode.DOWNGRADE,
                f"{name} {version} is stored here already and is not the active version "
                f"({previous or 'none'}); a deploy does not bring it back",
            )
        for stage in ("validating", "swapping", "probation"):
            self._progress(dev, cid, stage)
            yield self.probation_s if stage == "probation" else delay
        if dev.fail_deploy is not None:
            code, message, left = dev.fail_deploy
            if left is not None:
                dev.fail_deploy = (code, message, left - 1) if left > 1 else None
            if code is ReplyCode.PROBATION_FAILED:
                dev.failed_versions.add((name, version))
                if old is not None:
                    # As the agent says it in its state (agent/models/lifecycle.py), which
                    # is how the server and the dashboard see a failed probation.
                    note = f"version {version} failed probation ({message}); rolled back"
                    dev.models[name] = old.model_copy(update={"message": note})
                    self.out.publish_state(dev)
            raise CommandFailed(code, message, {"model": name, "version": version,
                                                "rolled_back_to": previous})  # fmt: skip
        versions = [*(old.versions if old else []), version]
        dev.installed.append(f"{name} {version}")
        dev.models[name] = ModelState(
            name=name, active=version, last_known_good=version, status="serving",
            versions=list(dict.fromkeys(versions)),
        )  # fmt: skip
        if previous is not None:
            dev.previous[name] = previous
        self.out.publish_state(dev)
        self._finish(dev, cid, {"model": name, "version": version, "previous": previous,
                                "pipelines": [dev.pipeline]})  # fmt: skip

    def _rollback(self, dev: DeviceSim, command: RollbackCommand) -> dict[str, Any]:
        m = dev.models.get(command.model)
        target = command.to_version or dev.previous.get(command.model)
        if m is None or target is None or target not in m.versions:
            raise CommandFailed(ReplyCode.NOT_FOUND, f"no version to roll back to: {target}")
        previous = m.active
        dev.models[m.name] = m.model_copy(
            update={"active": target, "last_known_good": target, "status": "serving",
                    "message": f"rolled back to {target} by command"}
        )  # fmt: skip
        if previous is not None and previous != target:
            dev.previous[m.name] = previous
        return {"model": m.name, "version": target, "previous": previous}


def fetch(url: str, timeout: float) -> None:
    """GET the artifact (and read it), as a device would; ``download_failed`` if not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while response.read(64 * 1024):
                pass
    except (OSError, ValueError) as exc:
        raise CommandFailed(ReplyCode.DOWNLOAD_FAILED, f"{url}: {exc}") from None


def telemetry_of(dev: DeviceSim) -> Telemetry:
    """Plausible figures for one pipeline, varying a little with the seq."""
    model = next(iter(dev.models.values()), None)
    wobble = (dev.seq % 7) / 10
    return Telemetry(
        device=dev.id,
        seq=dev.seq,
        ts=time.time(),
        uptime_s=time.time() - dev.since,
        cpu_percent=20.0 + wobble * 10,
        mem_rss_mb=180.0 + wobble,
        temperature_c=48.0 + wobble,
        outbox_depth=dev.seq % 3,
        pipelines={
            dev.pipeline: PipelineTelemetry(
                model=model.name if model else None,
                version=model.active if model else None,
                fps=14.5 + wobble,
                invoke_ms_p50=3.0,
                invoke_ms_p95=4.2 + wobble,
                frames_in=dev.seq * 15,
                results_out=dev.seq * 15,
                source_state="open",
                stages={"invoke": StageLatency(p50=3.0, p95=4.2 + wobble)},
            )
        },
    )
