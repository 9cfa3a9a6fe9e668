"""The command plane: commands in, replies out, work handed to a ``CommandTarget``.

Messages arrive on the network thread and are only queued there. The ``commands``
thread decodes and checks each one (size, depth, JSON, op, schema, expiry,
signature, repeated id), answers ``accepted`` at once and answers ``ping`` and
``status`` itself, so they stay prompt during a deploy. Long work runs on two
lanes, each one command at a time with a bounded queue (full: ``busy``): deploy
and restart on ``command-work``, rollback and config on ``command-control``, so a
rollback never waits behind a deploy. Every command ends in ``done`` or
``failed``; a payload without a usable id is counted (``refused``), not answered.
No payload ends the commands thread.

At start, the commands the record holds as accepted without a final reply (the
agent stopped or died while they ran) are answered ``failed``/``interrupted`` on
their own route once the link is up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import AckCallback, Incoming, Link
from agent.link.command_record import CommandRecord, RecordError, Route, Unfinished
from agent.link.kind_counter import KindCounter
from agent.link.lanes import Lane
from agent.link.progress import ProgressReporter
from agent.link.reply_routes import ReplyRoutes
from agent.link.signing import CommandVerifier
from agent.link.transfer import ArtifactFetcher

log = logging.getLogger(__name__)


class CommandTarget(Protocol):
    """What executes commands: the model lifecycle plus the service (see CONTRACT.md)."""

    def deploy(
        self,
        manifest: dict[str, Any],
        signature: str | None,
        model_file: Path,
        pipeline: str | None,
        progress: p.Progress,
        *,
        shadow: bool | None = None,
        min_agreement: float | None = None,
    ) -> dict[str, Any]:
        """``shadow`` and ``min_agreement`` are passed only when the command sets them."""
        ...

    def rollback(
        self, model: str, to_version: str | None, progress: p.Progress
    ) -> dict[str, Any]: ...

    def check_deploy(self, model: str, pipeline: str | None) -> None:
        """Before any download: raises ``CommandFailed`` (not_found, incompatible, busy)
        when a deploy of ``model`` on ``pipeline`` would be refused whatever the file."""
        ...

    def model_states(self) -> list[p.ModelState]: ...

    def status(self) -> dict[str, Any]: ...

    def apply_config(self, changes: dict[str, Any]) -> dict[str, Any]: ...

    def restart(self, pipeline: str | None) -> dict[str, Any]: ...


ReplyStatus = Literal["accepted", "progress", "done", "failed"]
MAX_QUEUED_COMMANDS = 1000
# Long commands waiting on one lane (besides the one running); past it: ``busy``.
MAX_PENDING_PER_LANE = 8
INTERRUPTED_MESSAGE = "the agent restarted while this command ran"
# A deploy cut off in probation ended as a failed trial: the model lifecycle does
# not serve an unproven version after a restart (it returns to last-known-good).
PROBATION_RESTART_MESSAGE = "agent restarted during probation; the version on trial was not kept"


def interrupted_outcome(op: str, stage: str | None) -> tuple[p.ReplyCode, str]:
    """The final reply of a command the last run left unfinished."""
    if op == "deploy" and stage == "probation":
        return p.ReplyCode.PROBATION_FAILED, PROBATION_RESTART_MESSAGE
    return p.ReplyCode.INTERRUPTED, INTERRUPTED_MESSAGE


WORK_OPS = ("deploy", "restart")
CONTROL_OPS = ("rollback", "config")


def _printable(value: Any, depth: int = 0) -> Any:
    """``value`` with every string made encodable as UTF-8 (a lone surrogate from a
    hostile payload becomes ``\\udXXX`` text), so a reply and its record can be
    written."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if depth > p.MAX_JSON_DEPTH:
        return str(type(value).__name__)
    if isinstance(value, dict):
        return {_printable(k, depth + 1): _printable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v, depth + 1) for v in value]
    return value


class CommandDispatcher:
    def __init__(
        self,
        config: AgentConfig,
        link: Link,
        target: CommandTarget,
        fetcher: ArtifactFetcher,
        state_changed: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
        record: CommandRecord | None = None,
    ) -> None:
        self.device = config.device.id
        self._groups = list(config.device.groups)
        self._topics = p.Topics(config.mqtt.topic_prefix)
        self._routes = ReplyRoutes(self._topics, self.device, config.mqtt.reply_topics)
        self._link = link
        self._target = target
        self._fetcher = fetcher
        self._state_changed = state_changed
        self._clock = clock
        self._verifier = CommandVerifier(config) if config.mqtt.require_signed_commands else None
        self._recent = record or CommandRecord(config.state_dir / "commands.sqlite3")
        # None wakes the commands thread (the link came up).
        self._queue: queue.Queue[Incoming | None] = queue.Queue(MAX_QUEUED_COMMANDS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._work = Lane("command-work", MAX_PENDING_PER_LANE)
        self._control = Lane("command-control", MAX_PENDING_PER_LANE)
        self._interrupted: list[Unfinished] = []
        self._interrupted_acked: queue.SimpleQueue[tuple[str, p.ReplyCode, str]] = (
            queue.SimpleQueue()
        )
        self.ignored = 0
        self.heartbeat = time.monotonic()  # the commands loop's, for the supervisor
        self._refusals = KindCounter("payloads refused without a reply")
        self._bad_routes = KindCounter("response topics refused")
        self._unrecorded = KindCounter("replies sent but not recorded")

    # ----------------------------------------------------------------- counters

    @property
    def refused(self) -> dict[str, int]:
        """Payloads dropped without a reply because they carried no usable id, by kind
        (``bad_json``, ``too_large``, ``schema``, ``unknown_op``, ``internal``, ...)."""
        return self._refusals.snapshot()

    @property
    def counters(self) -> dict[str, Any]:
        """For status and telemetry: what the command plane dropped or could not do."""
        return {
            "ignored": self.ignored,
            "refused": self.refused,
            "response_topics_refused": self._bad_routes.snapshot(),
            "unrecorded": self._unrecorded.snapshot(),
            "pending": {"work": self._work.pending, "control": self._control.pending},
        }

    @property
    def lanes(self) -> tuple[Lane, Lane]:
        """The long-command lanes (deploy/restart, rollback/config), for the supervisor."""
        return self._work, self._control

    @property
    def alive(self) -> bool:
        """The commands thread and both lanes are running."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._work.alive and self._control.alive

    @property
    def command_topics(self) -> list[str]:
        return [self._topics.cmd(self.device)] + [self._topics.group_cmd(g) for g in self._groups]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._recent.open()
        try:
            self._interrupted = self._recent.unfinished()
        except RecordError as exc:
            log.error("cannot read the command record: %s", exc)
            self._interrupted = []
        self._stop.clear()
        self._work.start()
        self._control.start()
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()
        self._link.add_connect_listener(self._wake)
        for topic in self.command_topics:
            self._link.subscribe(topic, self._on_message, qos=1)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking commands and wait, up to ``timeout`` seconds in all, for the
        running ones to reply; the record closes after that. Queued commands are
        dropped: they stay accepted in the record and are answered ``interrupted``
        at the next start."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        # No unsubscribe: the subscriptions belong to the persistent session, so
        # commands sent while the agent is down wait at the broker.
        self._stop.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        finished = [lane.stop(deadline - time.monotonic()) for lane in (self._work, self._control)]
        if not all(finished):
            # Its reply, if it ever comes, is still sent; recording it fails harmlessly.
            log.warning("a command was still running at stop; closing the record anyway")
        self._record_acked_interruptions()
        self._recent.close()
        self._thread = None

    def thread(self) -> threading.Thread | None:
        """The commands thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def restart_thread(self) -> None:
        """A fresh commands thread after the last one died; queued commands wait for it."""
        if not self._stop.is_set() and self._thread is not None:
            self.heartbeat = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ network thread

    def _on_message(self, incoming: Incoming) -> None:
        try:
            self._queue.put_nowait(incoming)
        except queue.Full:
            # Ignored by rule: a flood must not grow memory; the sender can retry.
            self.ignored += 1
            if self.ignored % 100 == 1:
                log.warning("command queue full: ignored %d command(s) so far", self.ignored)

    def submit(self, payload: bytes) -> None:
        """A command made on the device (a Home Assistant button press): handled as if
        it had arrived on the device's command topic, with the same checks, record and
        replies. Never blocks (network thread)."""
        self._on_message(Incoming(topic=self._topics.cmd(self.device), payload=payload))

    def _wake(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread is busy anyway and checks the link on its next turn

    # ----------------------------------------------------------- commands thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                self._answer_interrupted()
                self._record_acked_interruptions()
            except Exception as exc:
                self._refusals.count("interrupted_replies_failed", f"{type(exc).__name__}: {exc}")
            try:
                incoming = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if incoming is None:
                continue
            try:
                self._handle(incoming)
            except Exception as exc:
                self._last_resort(incoming, exc)

    def _last_resort(self, incoming: Incoming, exc: Exception) -> None:
        """Answer a payload whose handling failed unexpectedly; never raises, so no
        payload can end the commands thread."""
        try:
            command_id = p.command_id_of(incoming.payload)
            if not command_id:
                self._refusals.count(p.ReplyCode.INTERNAL.value, f"{type(exc).__name__}: {exc}")
                return
            log.error("handling command %s failed", command_id, exc_info=exc)
            self._reply(
                self._route(incoming),
                command_id,
                "failed",
                p.ReplyCode.INTERNAL,
                f"internal error: {type(exc).__name__}",
            )
        except Exception as again:
            self._refusals.count("last_resort_failed", f"{type(again).__name__}")

    def _answer_interrupted(self) -> None:
        """Once the link is up, the final reply of each command the last run left
        unfinished; it is marked answered when the broker acknowledges it."""
        if not self._interrupted or not self._link.connected:
            return
        pending, self._interrupted = self._interrupted, []
        for item in pending:
            route = item.route or Route(self._routes.default, None)
            log.warning("command %s (%s) was interrupted by a restart", item.command_id, item.op)
            code, message = interrupted_outcome(item.op, item.stage)
            sent = self._reply(
                route,
                item.command_id,
                "failed",
                code,
                message,
                {"op": item.op, "stage": item.stage} if item.stage else {"op": item.op},
                on_ack=self._on_interrupted_ack(item.command_id, code, message),
            )
            if not sent:
                self._interrupted.append(item)  # try again at the next turn

    def _on_interrupted_ack(self, command_id: str, code: p.ReplyCode, message: str) -> AckCallback:
        def acked(ok: bool) -> None:
            if ok:
                self._interrupted_acked.put((command_id, code, message))

        return acked

    def _record_acked_interruptions(self) -> None:
        # Written here, not in the ack callback: that runs on the network thread,
        # which must not wait on the disk.
        while True:
            try:
                command_id, code, message = self._interrupted_acked.get_nowait()
            except queue.Empty:
                return
            self._try_record(command_id, "failed", code, message, None)

    def _route(self, incoming: Incoming) -> Route:
        topic = incoming.response_topic
        route = self._routes.route(topic, incoming.correlation_data)
        if topic is not None and route.topic != topic:
            self._bad_routes.count("not allowed", topic)
        return route

    def _handle(self, incoming: Incoming) -> None:
        route = self._route(incoming)
        try:
            command = p.decode_command(incoming.payload)
        except p.ProtocolError as err:
            command_id = p.command_id_of(incoming.payload)
            if not command_id:
                # Nobody could match an answer without an id; a group of devices
                # answering garbage with blank ids would only amplify it.
                self._refusals.count(err.code.value, err.message)
                return
            log.info("refused command %s: %r", command_id, err.message[:200])
            self._reply(route, command_id, "failed", err.code, err.message)
            return
        now = self._clock()
        if command.expires_at is not None and command.expires_at < now:
            message = f"expired {now - command.expires_at:.0f}s ago"
            self._reply(route, command.id, "failed", p.ReplyCode.EXPIRED, message)
            return
        if self._verifier is not None:
            try:
                problem = self._verifier.problem(incoming, command, now, self._recent)
            except RecordError as exc:
                problem = f"cannot check the command nonce: {exc}"
            if problem is not None:
                log.warning("refused command %s: %s", command.id, problem)
                self._reply(route, command.id, "failed", p.ReplyCode.BAD_SIGNATURE, problem)
                return
        try:
            original = self._recent.get(command.id)
        except RecordError as exc:
            # Cannot tell a repeat: harmless for ping and status, not for the rest.
            if command.op not in ("ping", "status"):
                message = f"cannot read the command record: {exc}"
                self._reply(route, command.id, "failed", p.ReplyCode.STORAGE_FAILED, message)
                return
            original = None
        if original is not None:
            self._reply(
                route,
                command.id,
                "failed",
                p.ReplyCode.DUPLICATE,
                "this command id was seen before; not executed again",
                {"original": original},
            )
            return
        lane = self._lane_for(command)
        if lane is not None and lane.pending >= lane.max_pending:
            message = f"{lane.pending} command(s) already wait on {lane.name}; try again later"
            self._reply(route, command.id, "failed", p.ReplyCode.BUSY, message)
            return
        try:
            self._recent.accept(command.id, command.op, route)
        except RecordError as exc:
            # Still executed and answered: a full disk must not make the device
            # unmanageable; a redelivery of this id could then run it again.
            self._unrecorded.count("accepted", f"{command.id}: {exc}")
        self._reply(route, command.id, "accepted", p.ReplyCode.ACCEPTED, command.op)
        if isinstance(command, p.PingCommand):
            self._finish(route, command.id, {"pong": True, "ts": self._clock()})
        elif isinstance(command, p.StatusCommand):
            self._execute(route, command, lambda _progress: self._status())
        else:
            assert lane is not None
            work = self._work_for(command)
            if not lane.submit(lambda: self._execute(route, command, work)):
                self._fail(route, command.id, p.ReplyCode.BUSY, f"{lane.name} is not taking work")

    def _lane_for(self, command: p.Command) -> Lane | None:
        if command.op in WORK_OPS:
            return self._work
        if command.op in CONTROL_OPS:
            return self._control
        return None

    def _status(self) -> dict[str, Any]:
        data = dict(self._target.status())
        data.setdefault(
            "models", [m.model_dump(exclude_none=True) for m in self._target.model_states()]
        )
        data.setdefault("commands", self.counters)
        return data

    def _work_for(self, command: p.Command) -> Callable[[p.Progress], dict[str, Any]]:
        if isinstance(command, p.DeployCommand):
            return lambda progress: self._deploy(command, progress)
        if isinstance(command, p.RollbackCommand):
            return lambda progress: self._changed(
                self._target.rollback(command.model, command.to_version, progress)
            )
        if isinstance(command, p.ConfigCommand):
            return lambda _progress: self._target.apply_config(dict(command.changes))
        if isinstance(command, p.RestartCommand):
            return lambda _progress: self._target.restart(command.pipeline)
        raise p.CommandFailed(p.ReplyCode.UNKNOWN_OP, f"no handler for {command.op}")

    def _deploy(self, command: p.DeployCommand, progress: p.Progress) -> dict[str, Any]:
        manifest = dict(command.manifest)
        model_file = self._fetcher.fetch(
            command.id,
            command.artifact,
            manifest,
            progress,
            signature=command.signature,
            # Nothing is downloaded for a deploy the device would refuse whatever the file.
            before_download=lambda parsed: self._target.check_deploy(parsed.name, command.pipeline),
        )
        # Only what the command sets: a target that knows none of them still works.
        checks: dict[str, Any] = {
            k: v
            for k, v in (("shadow", command.shadow), ("min_agreement", command.min_agreement))
            if v is not None
        }
        try:
            return self._changed(
                self._target.deploy(
                    manifest, command.signature, model_file, command.pipeline, progress, **checks
                )
            )
        finally:
            model_file.unlink(missing_ok=True)

    def _changed(self, data: dict[str, Any]) -> dict[str, Any]:
        if self._state_changed is not None:
            try:
                self._state_changed()
            except Exception:
                log.exception("publishing the new state failed")
        return data

    def _execute(
        self, route: Route, command: p.Command, work: Callable[[p.Progress], dict[str, Any]]
    ) -> None:
        try:
            data = work(self._progress(route, command.id))
        except p.CommandFailed as err:
            log.warning("command %s (%s) failed: %s", command.id, command.op, err.message[:500])
            self._fail(route, command.id, err.code, err.message, err.data)
            if command.op in ("deploy", "rollback"):
                self._changed({})
        except Exception as exc:
            log.exception("command %s (%s) failed unexpectedly", command.id, command.op)
            self._fail(route, command.id, p.ReplyCode.INTERNAL, f"internal error: {exc}")
        else:
            self._finish(route, command.id, data)

    def _finish(self, route: Route, command_id: str, data: dict[str, Any] | None) -> None:
        data = _printable(data)
        self._try_record(command_id, "done", p.ReplyCode.OK, "", data)
        self._reply(route, command_id, "done", p.ReplyCode.OK, "", data)

    def _fail(
        self,
        route: Route,
        command_id: str,
        code: p.ReplyCode,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        message, data = _printable(message), _printable(data)
        self._try_record(command_id, "failed", code, message, data)
        self._reply(route, command_id, "failed", code, message, data)

    def _try_record(
        self,
        command_id: str,
        status: str,
        code: p.ReplyCode,
        message: str,
        data: dict[str, Any] | None,
    ) -> bool:
        """Record a final outcome; a failure (disk full, record closed at stop) is
        counted and logged, never raised: the reply is sent regardless."""
        try:
            self._recent.record(command_id, status, code, message, data)
        except RecordError as exc:
            self._unrecorded.count(status, f"{command_id}: {exc}")
            return False
        except Exception as exc:
            self._unrecorded.count(status, f"{command_id}: {type(exc).__name__}: {exc}")
            return False
        return True

    def _progress(self, route: Route, command_id: str) -> p.Progress:
        def note(stage: str) -> None:
            try:
                self._recent.note_stage(command_id, stage)
            except RecordError as exc:
                self._unrecorded.count("stage", f"{command_id}: {exc}")

        def send(stage: str, percent: float | None, data: dict[str, Any] | None = None, /) -> None:
            self._reply(
                route, command_id, "progress", p.ReplyCode.IN_PROGRESS, stage, data, stage, percent
            )

        return ProgressReporter(send, on_new_stage=note)

    def _reply(
        self,
        route: Route,
        command_id: str,
        status: ReplyStatus,
        code: p.ReplyCode,
        message: str = "",
        data: dict[str, Any] | None = None,
        stage: str | None = None,
        percent: float | None = None,
        on_ack: AckCallback | None = None,
    ) -> bool:
        """Publish one reply; never raises. False when it could not be queued."""
        try:
            payload = self._encode_reply(command_id, status, code, message, data, stage, percent)
            queued = self._link.publish(
                route.topic,
                payload,
                qos=1,
                on_ack=on_ack,
                correlation_data=route.correlation_data,
            )
        except Exception as exc:
            self._unrecorded.count("reply_not_sent", f"{command_id}: {type(exc).__name__}")
            return False
        if not queued:
            log.warning("could not queue the %s reply to %s", status, command_id)
        return queued

    def _encode_reply(
        self,
        command_id: str,
        status: ReplyStatus,
        code: p.ReplyCode,
        message: str,
        data: dict[str, Any] | None,
        stage: str | None,
        percent: float | None,
    ) -> bytes:
        try:
            return p.Reply(
                id=command_id,
                device=self.device,
                status=status,
                code=code,
                message=_printable(message),
                ts=self._clock(),
                stage=stage,
                percent=percent,
                data=_printable(data),
            ).to_bytes()
        except (ValueError, TypeError) as exc:
            # e.g. data a target returned that is not JSON: still answer.
            log.error("cannot encode the reply to %s: %s", command_id, exc)
            return p.Reply(
                id=command_id,
                device=self.device,
                status="failed",
                code=p.ReplyCode.INTERNAL,
                message=_printable(f"reply could not be encoded: {exc}"),
                ts=self._clock(),
            ).to_bytes()
