"""Rollouts: which devices, in which waves, and when to stop.

The planning and decision functions are pure (targets, canary waves, applying a
reply, halting, the exit code), so they are unit-tested without a broker.
``CommandRun`` drives one command (deploy, rollback, ping) through its waves over a
``Console``: it sends, follows the replies, sends again to a device that comes
back online before the command expires, and stops at the failure threshold.
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.protocol import Command, ReplyCode, State

from .console import Event, ReplyEvent, StateEvent

log = logging.getLogger(__name__)

# Exit codes of deploy, rollback and ping (also in README.md).
EXIT_OK = 0  # every targeted device ended on the new version / answered
EXIT_ERROR = 1  # the broker could not be reached, or another runtime error
EXIT_USAGE = 2  # bad arguments, an unusable, unsigned or tampered bundle
EXIT_HALTED = 3  # failures exceeded --max-failures: the rollout stopped before the rest
EXIT_FAILED = 4  # at least one device failed (within --max-failures, nothing skipped)
EXIT_TIMEOUT = 5  # at least one device had not finished (or was offline) at the deadline

FINAL = frozenset({"done", "failed", "skipped", "timeout"})


# ------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    device: str
    online: bool
    known: bool  # a retained state was seen


def resolve_targets(
    states: Mapping[str, State | None], devices: Sequence[str], group: str | None
) -> list[Target]:
    """Named devices (known or not), or every device whose retained state lists the group."""
    if devices and group:
        raise ValueError("give either devices or a group, not both")
    if group:
        names = sorted(d for d, s in states.items() if s is not None and group in s.groups)
        if not names:
            raise ValueError(f"no device has announced group {group!r} in its retained state")
    elif devices:
        names = list(dict.fromkeys(devices))
    else:
        raise ValueError("no target: give --device ID or --group G")
    targets = []
    for name in names:
        state = states.get(name)
        targets.append(Target(name, state is not None and state.online, state is not None))
    return targets


@dataclass(frozen=True)
class Canary:
    count: int | None = None
    percent: float | None = None

    def size(self, total: int) -> int:
        """How many of ``total`` devices go first; at least one, at most all."""
        if total == 0:
            return 0
        n = self.count if self.count is not None else math.ceil(total * (self.percent or 0) / 100)
        return max(1, min(total, n))


def parse_canary(text: str) -> Canary:
    """``N`` devices or ``P%`` of the targets."""
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return Canary(percent=percent)
        count = int(text)
        if count < 1:
            raise ValueError
        return Canary(count=count)
    except ValueError:
        raise ValueError(
            f"--canary {text!r}: expected a number of devices (>= 1) or a percentage like 10%"
        ) from None


def split_evenly(targets: Sequence[Target], parts: int) -> list[list[Target]]:
    """``targets`` in order, cut into at most ``parts`` waves whose sizes differ by at most
    one (the earlier ones larger); no empty wave."""
    if parts < 1:
        raise ValueError("a plan needs at least one wave")
    parts = min(parts, len(targets))
    waves: list[list[Target]] = []
    start = 0
    for i in range(parts):
        size = len(targets) // parts + (1 if i < len(targets) % parts else 0)
        waves.append(list(targets[start : start + size]))
        start += size
    return waves


def plan_waves(
    targets: Sequence[Target], canary: Canary | None, rest_waves: int = 1
) -> list[list[Target]]:
    """The canary wave (online devices first), if any, then the rest in ``rest_waves``
    waves of near-equal size; no empty wave."""
    if not targets:
        return []
    if canary is None:
        return split_evenly(targets, rest_waves)
    n = canary.size(len(targets))
    # Online devices first, so the canary wave does not wait on a device that is away.
    ranked = sorted(targets, key=lambda t: (not t.online, not t.known))
    first = ranked[:n]
    rest = [t for t in targets if t not in first]
    return [first, *split_evenly(rest, rest_waves)] if rest else [first]


# ------------------------------------------------------------------- progress


@dataclass
class DeviceProgress:
    """Where one device is in the run; ``status`` is waiting, pending, sent, accepted, a
    progress stage (downloading, validating, probation, ...), done, failed, skipped or
    timeout."""

    device: str
    wave: int
    online: bool
    status: str = "waiting"
    command_id: str | None = None
    code: str | None = None
    message: str = ""
    percent: float | None = None
    data: dict[str, object] | None = None
    sent_at: float | None = None
    finished_at: float | None = None
    # Sent while the device was offline: the broker holds a copy for it.
    queued: bool = False
    # That copy was refused as badly signed and the command was sent again, signed anew.
    signed_again: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "device": self.device,
            "wave": self.wave,
            "status": self.status,
            "online": self.online,
        }
        for key in ("command_id", "code", "percent", "data"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.message:
            out["message"] = self.message
        if self.sent_at is not None and self.finished_at is not None:
            out["seconds"] = round(self.finished_at - self.sent_at, 3)
        return out


def apply_reply(
    progress: DeviceProgress,
    status: str,
    code: str,
    message: str,
    stage: str | None,
    percent: float | None,
    data: dict[str, object] | None,
    now: float,
) -> bool:
    """Fold one reply into a device's progress; returns whether anything visible changed."""
    if progress.final:
        return False
    if code == ReplyCode.DUPLICATE.value:
        # The device already has this command (it was re-sent when it came online).
        return False
    before = (progress.status, progress.percent, progress.code, progress.message)
    if status in ("done", "failed"):
        progress.status = status
        progress.finished_at = now
        progress.data = data
    elif status == "progress":
        progress.status = stage or "in progress"
        if data is not None:  # the stage's running figures (shadow: agreement)
            progress.data = data
    elif status == "accepted" and progress.status in ("waiting", "pending", "sent"):
        progress.status = "accepted"
    progress.code = code
    progress.message = message
    progress.percent = percent if status == "progress" else None
    return before != (progress.status, progress.percent, progress.code, progress.message)


def count_failures(devices: Sequence[DeviceProgress]) -> int:
    return sum(1 for d in devices if d.status in ("failed", "timeout"))


def should_halt(failures: int, max_failures: int) -> bool:
    return failures > max_failures


def outcome(devices: Sequence[DeviceProgress], halted: bool) -> tuple[str, int]:
    """("ok" | "halted" | "failed" | "timeout", exit code) of a finished run."""
    if halted:
        return "halted", EXIT_HALTED
    if any(d.status == "failed" for d in devices):
        return "failed", EXIT_FAILED
    if any(d.status != "done" for d in devices):
        return "timeout", EXIT_TIMEOUT
    return "ok", EXIT_OK


# ------------------------------------------------------------------- running


class Sender(Protocol):
    """What a run needs of the console."""

    events: queue.Queue[Event]

    def send(self, device: str, command: Command, timeout: float = ...) -> None: ...

    def send_many(self, commands: Iterable[tuple[str, Command]], timeout: float = ...) -> None: ...


@dataclass
class RunReport:
    devices: list[DeviceProgress]
    halted: bool
    result: str
    exit_code: int
    expires_at: float

    def failed(self) -> list[DeviceProgress]:
        return [d for d in self.devices if d.status in ("failed", "timeout")]

    def unfinished(self) -> list[DeviceProgress]:
        return [d for d in self.devices if d.status not in ("done", "failed")]


@dataclass
class RunHooks:
    on_change: Callable[[DeviceProgress], None] = lambda _p: None


@dataclass
class CommandRun:
    """Send one command to every target, wave by wave, and follow the replies."""

    sender: Sender
    waves: list[list[Target]]
    make_command: Callable[[str, float, float], Command]  # (id, issued_at, expires_at)
    expires_at: float
    deadline: float  # time.time() after which the run stops waiting
    max_failures: int = 0
    hooks: RunHooks = field(default_factory=RunHooks)
    op: str = "cmd"
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.progress = {
            t.device: DeviceProgress(t.device, wave, t.online)
            for wave, targets in enumerate(self.waves)
            for t in targets
        }
        self._by_id: dict[str, DeviceProgress] = {}
        self._commands: dict[str, Command] = {}
        self.halted = False

    def run(self) -> RunReport:
        for wave, targets in enumerate(self.waves):
            if self.halted:
                for t in targets:
                    self._set(self.progress[t.device], "skipped", "not sent: the rollout halted")
                continue
            self._send([self.progress[t.device] for t in targets])
            self._follow([self.progress[t.device] for t in targets])
            # The devices of this wave all finish (or time out) before the decision, so
            # the report says how every commanded device ended.
            failures = count_failures(list(self.progress.values()))
            if should_halt(failures, self.max_failures) and wave < len(self.waves) - 1:
                self.halted = True
        devices = list(self.progress.values())
        result, code = outcome(devices, self.halted)
        return RunReport(devices, self.halted, result, code, self.expires_at)

    # ----------------------------------------------------------------------

    def _send(self, wave: list[DeviceProgress]) -> None:
        now = self.clock()
        for p in wave:
            if p.command_id is None:
                p.command_id = f"{self.op[:3]}-{uuid.uuid4().hex[:12]}"
                self._by_id[p.command_id] = p
                self._commands[p.device] = self.make_command(p.command_id, now, self.expires_at)
                p.sent_at = now
        self.sender.send_many([(p.device, self._commands[p.device]) for p in wave])
        for p in wave:
            p.queued = p.queued or not p.online
            # An offline device gets it from its persistent session when it reconnects.
            if p.online:
                self._set(p, "sent", "")
            else:
                self._set(p, "pending", "offline: the broker keeps the command until it returns")

    def _follow(self, wave: list[DeviceProgress]) -> None:
        until = min(self.deadline, self.expires_at)
        while not all(p.final for p in wave):
            remaining = until - self.clock()
            if remaining <= 0:
                break
            try:
                event = self.sender.events.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            self._handle(event)
        for p in wave:
            if not p.final:
                reason = "command expired" if self.clock() >= self.expires_at else "timed out"
                self._set(p, "timeout", f"{reason} while {p.status}")

    def _handle(self, event: Event) -> None:
        if isinstance(event, ReplyEvent):
            r = event.reply
            p = self._by_id.get(r.id)
            if p is None or p.device != event.device:
                return
            if self._queued_copy_refused(p, r.status, r.code):
                return
            if apply_reply(
                p, r.status, r.code.value, r.message, r.stage, r.percent, r.data, self.clock()
            ):
                self.hooks.on_change(p)
        elif isinstance(event, StateEvent):
            p = self.progress.get(event.device)
            if p is None:
                return
            came_online = event.state.online and not p.online
            p.online = event.state.online
            if came_online and p.command_id is not None and p.status == "pending":
                # Also covers a device without a persistent session yet; the protocol
                # answers a repeated id again but never runs it twice.
                log.info("%s is back online: sending %s again", p.device, p.command_id)
                self._send([p])
                self._set(p, "sent", "back online")

    def _queued_copy_refused(self, p: DeviceProgress, status: str, code: ReplyCode) -> bool:
        """A device back from offline reads the broker's queued copy first. A device that
        requires signed commands refuses that copy once it is older than its
        ``mqtt.command_max_age_s``, though the command has not expired: send it once more,
        signed now (the console signs at each send), instead of counting a failure. A
        refusal for any other cause is refused again and then counts."""
        if status != "failed" or code != ReplyCode.BAD_SIGNATURE:
            return False
        if not p.queued or p.signed_again or p.final:
            return False
        p.signed_again = True
        log.info("%s refused the queued copy of %s: sending it again", p.device, p.command_id)
        self._send([p])
        self._set(p, "sent", "sent again, signed anew: the device refused the queued copy")
        return True

    def _set(self, p: DeviceProgress, status: str, message: str) -> None:
        if status in FINAL and p.finished_at is None:
            p.finished_at = self.clock()
        if (p.status, p.message) != (status, message):
            p.status, p.message = status, message
            self.hooks.on_change(p)
