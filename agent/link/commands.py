"""The command plane: commands in, replies out, work handed to a ``CommandTarget``.

Messages arrive on the network thread and are only queued there. The ``commands``
thread decodes and checks each one (size, JSON, op, schema, expiry, signature,
repeated id), answers ``accepted`` at once and answers ``ping`` and ``status``
itself, so they stay prompt during a deploy. Long work (deploy, rollback, config,
restart) runs one at a time on the ``command-exec`` thread and ends in ``done`` or
``failed``. Whatever a client sends, the worst outcome is a ``failed`` reply.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Incoming, Link
from agent.link.signing import CommandVerifier
from agent.link.transfer import ArtifactFetcher
from agent.ops import faults

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
    ) -> dict[str, Any]: ...

    def rollback(
        self, model: str, to_version: str | None, progress: p.Progress
    ) -> dict[str, Any]: ...

    def model_states(self) -> list[p.ModelState]: ...

    def status(self) -> dict[str, Any]: ...

    def apply_config(self, changes: dict[str, Any]) -> dict[str, Any]: ...

    def restart(self, pipeline: str | None) -> dict[str, Any]: ...


ReplyStatus = Literal["accepted", "progress", "done", "failed"]
MAX_QUEUED_COMMANDS = 1000
RECENT_IDS_KEPT = 2000
_PROGRESS_INTERVAL_S = 0.5


class RefusalCounter:
    """Payloads refused without an answer (no usable id), counted by kind.

    Each kind is logged the first time and then at every power of ten, so a flood
    of garbage cannot flood the log. ``count`` never raises: it is the last thing
    the commands thread does when everything else failed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, kind: str, detail: str = "") -> None:
        try:
            with self._lock:
                n = self._counts.get(kind, 0) + 1
                self._counts[kind] = n
            if _is_power_of_ten(n):
                log.warning(
                    "refused %d payload(s) of kind %s without a reply; latest: %r",
                    n,
                    kind,
                    detail[:200],
                )
        except Exception:
            pass  # counting must not end the thread

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


@dataclass(frozen=True)
class _Route:
    """Where the replies to one command go."""

    topic: str
    correlation_data: bytes | None


class RecentCommands:
    """Ids of recent commands and how they ended, persisted so a command delivered
    again after a restart is still not executed twice."""

    def __init__(self, path: Path, keep: int = RECENT_IDS_KEPT) -> None:
        self.path = path
        self._keep = keep
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS recent (id TEXT PRIMARY KEY, status TEXT NOT NULL, "
            "code TEXT NOT NULL, message TEXT NOT NULL, data TEXT, ts REAL NOT NULL)"
        )
        db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL)")
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def get(self, command_id: str) -> dict[str, Any] | None:
        with self._lock:
            assert self._db is not None
            row = self._db.execute(
                "SELECT status, code, message, data FROM recent WHERE id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return None
        original: dict[str, Any] = {"status": row[0], "code": row[1], "message": row[2]}
        if row[3] is not None:
            original["data"] = json.loads(row[3])
        return original

    def record(
        self,
        command_id: str,
        status: str,
        code: p.ReplyCode,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        encoded = json.dumps(data, default=str) if data is not None else None
        with self._lock:
            assert self._db is not None
            self._db.execute(
                "INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?, ?, ?)",
                (command_id, status, code.value, message, encoded, time.time()),
            )
            self._db.execute(
                "DELETE FROM recent WHERE id NOT IN "
                "(SELECT id FROM recent ORDER BY ts DESC LIMIT ?)",
                (self._keep,),
            )

    def use_nonce(self, nonce: str, now: float, window_s: float) -> bool:
        """False if the nonce was already seen within the window (a replay)."""
        with self._lock:
            assert self._db is not None
            self._db.execute("DELETE FROM nonces WHERE ts < ?", (now - 2 * window_s,))
            try:
                self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, now))
            except sqlite3.IntegrityError:
                return False
            return True


class CommandDispatcher:
    def __init__(
        self,
        config: AgentConfig,
        link: Link,
        target: CommandTarget,
        fetcher: ArtifactFetcher,
        state_changed: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = config.device.id
        self._groups = list(config.device.groups)
        self._topics = p.Topics(config.mqtt.topic_prefix)
        self._link = link
        self._target = target
        self._fetcher = fetcher
        self._state_changed = state_changed
        self._clock = clock
        self._verifier = CommandVerifier(config) if config.mqtt.require_signed_commands else None
        self._recent = RecentCommands(config.state_dir / "commands.sqlite3")
        self._queue: queue.Queue[Incoming] = queue.Queue(MAX_QUEUED_COMMANDS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.ignored = 0
        self._refusals = RefusalCounter()

    @property
    def refused(self) -> dict[str, int]:
        """Payloads dropped without a reply because they carried no usable id, by kind
        (``bad_json``, ``too_large``, ``schema``, ``unknown_op``, ``internal``, ...)."""
        return self._refusals.snapshot()

    @property
    def command_topics(self) -> list[str]:
        return [self._topics.cmd(self.device)] + [self._topics.group_cmd(g) for g in self._groups]

    def start(self) -> None:
        if self._thread is not None:
            return
        self._recent.open()
        self._stop.clear()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="command-exec")
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()
        for topic in self.command_topics:
            self._link.subscribe(topic, self._on_message, qos=1)

    def stop(self, timeout: float = 5.0) -> None:
        thread, executor = self._thread, self._executor
        if thread is None or executor is None:
            return
        # No unsubscribe: the subscriptions belong to the persistent session, so
        # commands sent while the agent is down wait at the broker.
        self._stop.set()
        thread.join(timeout)
        # A running deploy cannot be interrupted safely; it finishes in the background
        # (its thread is not waited for) and queued ones are dropped.
        executor.shutdown(wait=False, cancel_futures=True)
        self._recent.close()
        self._thread = self._executor = None

    # ------------------------------------------------------------ network thread

    def _on_message(self, incoming: Incoming) -> None:
        try:
            self._queue.put_nowait(incoming)
        except queue.Full:
            # Ignored by rule: a flood must not grow memory; the sender can retry.
            self.ignored += 1
            if self.ignored % 100 == 1:
                log.warning("command queue full: ignored %d command(s) so far", self.ignored)

    # ----------------------------------------------------------- commands thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                incoming = self._queue.get(timeout=0.5)
            except queue.Empty:
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

    def _route(self, incoming: Incoming) -> _Route:
        topic = incoming.response_topic
        if not topic or "+" in topic or "#" in topic or len(topic) > 512:
            topic = self._topics.reply(self.device)
        return _Route(topic, incoming.correlation_data)

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
            problem = self._verifier.problem(incoming, command, now, self._recent)
            if problem is not None:
                log.warning("refused command %s: %s", command.id, problem)
                self._reply(route, command.id, "failed", p.ReplyCode.BAD_SIGNATURE, problem)
                return
        original = self._recent.get(command.id)
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
        self._recent.record(command.id, "accepted", p.ReplyCode.ACCEPTED, "interrupted")
        self._reply(route, command.id, "accepted", p.ReplyCode.ACCEPTED, command.op)
        if isinstance(command, p.PingCommand):
            self._finish(route, command.id, {"pong": True, "ts": self._clock()})
        elif isinstance(command, p.StatusCommand):
            self._execute(route, command, lambda _progress: self._status())
        else:
            assert self._executor is not None
            self._executor.submit(self._execute, route, command, self._work_for(command))

    def _status(self) -> dict[str, Any]:
        data = dict(self._target.status())
        data.setdefault(
            "models", [m.model_dump(exclude_none=True) for m in self._target.model_states()]
        )
        data.setdefault("commands", {"ignored": self.ignored, "refused": self.refused})
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
        model_file = self._fetcher.fetch(command.id, command.artifact, manifest, progress)
        try:
            return self._changed(
                self._target.deploy(
                    manifest, command.signature, model_file, command.pipeline, progress
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
        self, route: _Route, command: p.Command, work: Callable[[p.Progress], dict[str, Any]]
    ) -> None:
        try:
            data = work(self._progress(route, command.id))
        except p.CommandFailed as err:
            log.warning("command %s (%s) failed: %s", command.id, command.op, err.message)
            self._fail(route, command.id, err.code, err.message, err.data)
            if command.op in ("deploy", "rollback"):
                self._changed({})
        except Exception as exc:
            log.exception("command %s (%s) failed unexpectedly", command.id, command.op)
            self._fail(route, command.id, p.ReplyCode.INTERNAL, f"internal error: {exc}")
        else:
            self._finish(route, command.id, data)

    def _finish(self, route: _Route, command_id: str, data: dict[str, Any] | None) -> None:
        self._recent.record(command_id, "done", p.ReplyCode.OK, "", data)
        self._reply(route, command_id, "done", p.ReplyCode.OK, "", data)

    def _fail(
        self,
        route: _Route,
        command_id: str,
        code: p.ReplyCode,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._recent.record(command_id, "failed", code, message, data)
        self._reply(route, command_id, "failed", code, message, data)

    def _progress(self, route: _Route, command_id: str) -> p.Progress:
        last: dict[str, Any] = {"stage": None, "percent": None, "at": 0.0}

        def report(stage: str, percent: float | None) -> None:
            faults.at_stage(stage, percent)
            now = time.monotonic()
            if stage == last["stage"] and percent != 100.0:
                if now - last["at"] < _PROGRESS_INTERVAL_S or percent == last["percent"]:
                    return
            last.update(stage=stage, percent=percent, at=now)
            if percent is not None:
                percent = float(percent)
                percent = None if percent != percent else min(100.0, max(0.0, percent))
            self._reply(
                route, command_id, "progress", p.ReplyCode.IN_PROGRESS, stage, None, stage, percent
            )

        return report

    def _reply(
        self,
        route: _Route,
        command_id: str,
        status: ReplyStatus,
        code: p.ReplyCode,
        message: str = "",
        data: dict[str, Any] | None = None,
        stage: str | None = None,
        percent: float | None = None,
    ) -> None:
        try:
            reply = p.Reply(
                id=command_id,
                device=self.device,
                status=status,
                code=code,
                message=message,
                ts=self._clock(),
                stage=stage,
                percent=percent,
                data=data,
            )
            payload = reply.to_bytes()
        except (ValueError, TypeError) as exc:
            # e.g. data a target returned that is not JSON: still answer.
            log.error("cannot encode the reply to %s: %s", command_id, exc)
            payload = p.Reply(
                id=command_id,
                device=self.device,
                status="failed",
                code=p.ReplyCode.INTERNAL,
                message=f"reply could not be encoded: {exc}",
                ts=self._clock(),
            ).to_bytes()
        if not self._link.publish(
            route.topic, payload, qos=1, correlation_data=route.correlation_data
        ):
            log.warning("could not queue the %s reply to %s", status, command_id)
