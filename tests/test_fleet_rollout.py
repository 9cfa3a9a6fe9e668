"""Rollout planning and decisions, in process (the broker tests are in test_fleet_cli.py)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable

import pytest

from agent.protocol import Command, PingCommand, Reply, ReplyCode, State
from fleet.console import Event, ReplyEvent, StateEvent
from fleet.render import progress_line, report_table
from fleet.rollout import (
    EXIT_FAILED,
    EXIT_HALTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    Canary,
    CommandRun,
    DeviceProgress,
    RunReport,
    Target,
    apply_reply,
    outcome,
    parse_canary,
    plan_waves,
    resolve_targets,
)


def state(device: str, online: bool = True, groups: tuple[str, ...] = ()) -> State:
    return State(
        device=device, online=online, agent_version="x", groups=list(groups), since=0.0, ts=1.0
    )


# ------------------------------------------------------------------- pure parts


def test_resolve_targets_by_group_and_by_name() -> None:
    states: dict[str, State | None] = {
        "b": state("b", groups=("g",)),
        "a": state("a", online=False, groups=("g", "h")),
        "c": state("c", groups=("h",)),
    }
    assert resolve_targets(states, [], "g") == [Target("a", False, True), Target("b", True, True)]
    assert resolve_targets(states, ["c", "zz", "c"], None) == [
        Target("c", True, True),
        Target("zz", False, False),
    ]
    with pytest.raises(ValueError, match="no device has announced group 'nope'"):
        resolve_targets(states, [], "nope")
    with pytest.raises(ValueError, match="not both"):
        resolve_targets(states, ["a"], "g")
    with pytest.raises(ValueError, match="no target"):
        resolve_targets(states, [], None)


@pytest.mark.parametrize(
    ("text", "total", "size"),
    [("1", 4, 1), ("3", 2, 2), ("50%", 3, 2), ("10%", 4, 1), ("100%", 5, 5), ("25%", 8, 2)],
)
def test_canary_size(text: str, total: int, size: int) -> None:
    assert parse_canary(text).size(total) == size


@pytest.mark.parametrize("text", ["0", "-1", "x", "0%", "150%", "%"])
def test_bad_canary_is_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="--canary"):
        parse_canary(text)


def test_canary_wave_prefers_online_devices() -> None:
    targets = [
        Target("a", False, True),
        Target("b", True, True),
        Target("c", True, True),
        Target("d", False, False),
    ]
    assert plan_waves(targets, None) == [targets]
    first, rest = plan_waves(targets, Canary(count=2))
    assert [t.device for t in first] == ["b", "c"]
    assert [t.device for t in rest] == ["a", "d"]
    assert plan_waves(targets, Canary(percent=100)) == [
        [targets[1], targets[2], targets[0], targets[3]]
    ]


def test_the_rest_is_split_into_near_equal_waves() -> None:
    targets = [Target(name, True, True) for name in "abcdefgh"]
    waves = plan_waves(targets, Canary(count=1), rest_waves=3)
    assert [[t.device for t in w] for w in waves] == [
        ["a"],
        ["b", "c", "d"],
        ["e", "f"],
        ["g", "h"],
    ]
    # More waves than devices: no empty wave.
    assert [len(w) for w in plan_waves(targets[:3], Canary(count=1), rest_waves=5)] == [1, 1, 1]
    # Without a canary, every target is split.
    assert [len(w) for w in plan_waves(targets, None, rest_waves=3)] == [3, 3, 2]
    assert plan_waves([], Canary(count=1), rest_waves=2) == []
    with pytest.raises(ValueError, match="at least one wave"):
        plan_waves(targets, None, rest_waves=0)


def test_apply_reply_follows_stages_and_keeps_the_final_answer() -> None:
    p = DeviceProgress("a", 0, True, status="sent")
    assert apply_reply(p, "accepted", "accepted", "", None, None, None, 1.0)
    assert p.status == "accepted"
    assert apply_reply(p, "progress", "in_progress", "dl", "downloading", 40.0, None, 2.0)
    assert (p.status, p.percent) == ("downloading", 40.0)
    assert not apply_reply(p, "failed", "duplicate", "seen", None, None, None, 2.5)
    assert apply_reply(p, "failed", "validation_failed", "NaN", None, None, None, 3.0)
    assert (p.status, p.code, p.message, p.percent) == ("failed", "validation_failed", "NaN", None)
    assert not apply_reply(p, "done", "ok", "", None, None, None, 4.0)
    assert p.status == "failed" and p.finished_at == 3.0


def test_a_shadow_stage_shows_its_running_agreement() -> None:
    p = DeviceProgress("a", 0, True, status="accepted")
    figures = {"frames": 40, "agreement": 0.975, "distance": None}
    assert apply_reply(p, "progress", "in_progress", "shadow", "shadow", 40.0, figures, 2.0)
    assert (p.status, p.percent, p.data) == ("shadow", 40.0, figures)
    assert progress_line(p) == "  a                    shadow 40% agreement 0.97"
    final = {"model": "digits", "shadow": {"cam": {**figures, "frames": 100}}}
    assert apply_reply(p, "done", "ok", "", None, None, final, 3.0)
    assert p.data == final and progress_line(p) == "  a                    done"


def test_a_done_deploy_of_a_model_no_pipeline_uses_shows_the_devices_note() -> None:
    p = DeviceProgress("a", 0, True, status="accepted")
    note = "no pipeline uses model spare: version 1 is stored and validated, not served"
    final = {"model": "spare", "pipelines": [], "served": False, "note": note}
    assert apply_reply(p, "done", "ok", "", None, None, final, 3.0)
    assert progress_line(p) == f"  a                    done  ({note})"
    report = RunReport([p], halted=False, result="ok", exit_code=EXIT_OK, expires_at=0.0)
    assert report_table(report).splitlines()[1].split(None, 4)[4] == note


def test_outcome_precedence() -> None:
    done = DeviceProgress("a", 0, True, status="done")
    failed = DeviceProgress("b", 0, True, status="failed")
    late = DeviceProgress("c", 1, False, status="timeout")
    assert outcome([done], False) == ("ok", EXIT_OK)
    assert outcome([done, late], False) == ("timeout", EXIT_TIMEOUT)
    assert outcome([done, failed, late], False) == ("failed", EXIT_FAILED)
    assert outcome([done, failed], True) == ("halted", EXIT_HALTED)


# ------------------------------------------------------------------- CommandRun


class ScriptedSender:
    """Answers each send from a script, through the same event queue a Console fills."""

    def __init__(self, answers: dict[str, list[tuple[str, ReplyCode, str]]]) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.answers = answers
        self.sent: list[tuple[str, Command]] = []

    def send(self, device: str, command: Command, timeout: float = 10.0) -> None:
        self.sent.append((device, command))
        for status, code, message in self.answers.get(device, []):
            self.reply(device, command.id, status, code, message)

    def send_many(self, commands: Iterable[tuple[str, Command]], timeout: float = 10.0) -> None:
        for device, command in commands:
            self.send(device, command, timeout)

    def reply(self, device: str, cid: str, status: str, code: ReplyCode, message: str = "") -> None:
        r = Reply(
            id=cid,
            device=device,
            status=status,
            code=code,
            message=message,  # type: ignore[arg-type]
            ts=time.time(),
        )
        self.events.put(ReplyEvent(device, r, time.time()))


OK = [("accepted", ReplyCode.ACCEPTED, ""), ("done", ReplyCode.OK, "")]
BAD = [
    ("accepted", ReplyCode.ACCEPTED, ""),
    ("failed", ReplyCode.VALIDATION_FAILED, "outputs are NaN"),
]


def make_run(
    sender: ScriptedSender, waves: list[list[Target]], max_failures: int = 0, timeout: float = 5.0
) -> CommandRun:
    now = time.time()
    return CommandRun(
        sender=sender,
        waves=waves,
        make_command=lambda cid, issued, expires: PingCommand(id=cid, expires_at=expires),
        expires_at=now + 60,
        deadline=now + timeout,
        max_failures=max_failures,
    )


def online(*names: str) -> list[Target]:
    return [Target(n, True, True) for n in names]


def test_failed_canary_halts_before_the_rest() -> None:
    sender = ScriptedSender({"a": BAD, "b": OK, "c": OK})
    report = make_run(sender, [online("a"), online("b", "c")]).run()
    assert (report.result, report.exit_code, report.halted) == ("halted", EXIT_HALTED, True)
    assert [d for d, _ in sender.sent] == ["a"]
    statuses = {d.device: (d.status, d.code) for d in report.devices}
    assert statuses == {
        "a": ("failed", "validation_failed"),
        "b": ("skipped", None),
        "c": ("skipped", None),
    }


def test_failures_within_the_threshold_go_on() -> None:
    sender = ScriptedSender({"a": BAD, "b": OK, "c": OK})
    report = make_run(sender, [online("a", "b"), online("c")], max_failures=1).run()
    assert (report.result, report.exit_code, report.halted) == ("failed", EXIT_FAILED, False)
    assert sorted(d for d, _ in sender.sent) == ["a", "b", "c"]


def test_a_reply_from_another_device_with_the_same_id_is_ignored() -> None:
    sender = ScriptedSender({})
    run = make_run(sender, [online("a")], timeout=0.5)
    sender.answers["a"] = []
    original_send = sender.send

    def send_and_spoof(device: str, command: Command, timeout: float = 10.0) -> None:
        original_send(device, command, timeout)
        sender.reply("b", command.id, "done", ReplyCode.OK)

    sender.send = send_and_spoof  # type: ignore[method-assign]
    report = run.run()
    assert report.devices[0].status == "timeout"
    assert report.exit_code == EXIT_TIMEOUT


def test_offline_device_is_pending_then_sent_again_with_the_same_id_when_it_returns() -> None:
    sender = ScriptedSender({"a": OK})
    run = make_run(sender, [[Target("away", False, True), *online("a")]])
    # The device comes back: its retained state says online, then it answers.
    sender.events.put(StateEvent("away", state("away"), time.time()))
    sender.answers["away"] = OK
    report = run.run()
    assert report.result == "ok"
    sent = [(d, c.id) for d, c in sender.sent if d == "away"]
    assert len(sent) == 2 and sent[0][1] == sent[1][1]


def test_devices_that_never_answer_time_out() -> None:
    sender = ScriptedSender({"a": OK})
    report = make_run(sender, [[*online("a"), Target("away", False, True)]], timeout=0.5).run()
    by = {d.device: d for d in report.devices}
    assert by["a"].status == "done"
    assert by["away"].status == "timeout" and "while pending" in by["away"].message
    assert report.exit_code == EXIT_TIMEOUT


STALE = [("failed", ReplyCode.BAD_SIGNATURE, "command was signed -400s from now; allowed: 300s")]


def test_a_refused_queued_copy_is_sent_once_more_then_counts() -> None:
    # Sent while offline: the first answer is the refusal of the broker's stale copy;
    # the command goes out once more (signed anew by the console) and then succeeds.
    sender = ScriptedSender({})
    run = make_run(sender, [[Target("away", False, True)]])
    sender.answers["away"] = STALE
    original_send = sender.send

    def refuse_then_obey(device: str, command: Command, timeout: float = 10.0) -> None:
        original_send(device, command, timeout)
        sender.answers["away"] = OK

    sender.send = refuse_then_obey  # type: ignore[method-assign]
    report = run.run()
    assert report.result == "ok", report.devices
    assert [d for d, _ in sender.sent] == ["away", "away"]


def test_a_bad_signature_is_final_for_an_online_device_and_the_second_time() -> None:
    sender = ScriptedSender({"a": STALE, "away": STALE})
    report = make_run(sender, [[*online("a"), Target("away", False, True)]]).run()
    by = {d.device: d for d in report.devices}
    assert (by["a"].status, by["a"].code) == ("failed", "bad_signature")
    assert (by["away"].status, by["away"].code) == ("failed", "bad_signature")
    assert [d for d, _ in sender.sent].count("a") == 1
    assert [d for d, _ in sender.sent].count("away") == 2
