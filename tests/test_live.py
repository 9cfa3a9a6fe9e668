"""Live config changes (the `config` command) and reloads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError
from agent.config_changes import apply_changes, changed_keys, is_live_key
from agent.config_overrides import OVERRIDES_FILE, load_effective_config, save_overrides
from agent.control import AgentControl
from agent.live import LiveConfig
from agent.protocol import CommandFailed, ReplyCode, State
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "device": {"id": "pi-1"},
    "models": {"require_signature": False},
    "telemetry": {"interval_s": 10},
    "pipelines": [
        {"name": "cam", "model": "m", "source": {"type": "synthetic"}, "threshold": 0.2},
    ],
}


def write(tmp_path: Path, data: dict) -> Path:
    data = {**data, "state_dir": str(tmp_path / "state")}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_live_keys() -> None:
    assert is_live_key("telemetry.interval_s")
    assert is_live_key("pipelines.cam.threshold")
    assert is_live_key("pipelines.cam.publish.max_per_s")
    assert not is_live_key("mqtt.host")
    assert not is_live_key("pipelines.cam.source.fps")


def test_apply_changes_validates_and_names_keys() -> None:
    new = apply_changes(BASE, {"pipelines.cam.threshold": 0.7, "telemetry.interval_s": 2})
    assert new["pipelines"][0]["threshold"] == 0.7 and new["telemetry"]["interval_s"] == 2
    assert BASE["pipelines"][0]["threshold"] == 0.2  # the input is not modified
    with pytest.raises(ConfigError) as info:
        apply_changes(BASE, {"mqtt.host": "x", "pipelines.nope.threshold": 0.1})
    text = str(info.value)
    assert "mqtt.host: cannot change live" in text and "no pipeline named 'nope'" in text
    with pytest.raises(ConfigError, match=r"^pipelines\.cam\.threshold: "):
        apply_changes(BASE, {"pipelines.cam.threshold": 7})


def test_changes_persist_across_restarts_and_bad_ones_change_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    seen: list[float] = []
    live.subscribe(lambda c: seen.append(c.pipelines[0].threshold))
    assert live.apply({"pipelines.cam.threshold": 0.9}) == {
        "applied": {"pipelines.cam.threshold": 0.9}
    }
    assert seen == [0.9] and live.current.pipelines[0].threshold == 0.9
    with pytest.raises(ConfigError):
        live.apply({"telemetry.interval_s": -1})
    assert live.current.telemetry.interval_s == 10 and seen == [0.9]
    # A restart reads the file and the persisted overrides.
    assert load_effective_config(path).config.pipelines[0].threshold == 0.9


def test_reload_applies_live_keys_and_holds_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    edited = {**BASE, "telemetry": {"interval_s": 3}, "mqtt": {"host": "broker.lan"}}
    write(tmp_path, edited)
    outcome = live.reload()
    assert outcome == {"changed": ["telemetry.interval_s"], "restart_needed": ["mqtt.host"]}
    assert live.current.telemetry.interval_s == 3
    assert live.current.mqtt.host == "localhost"  # until the restart
    assert live.restart_needed == ["mqtt.host"]


def test_reload_of_a_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    path.write_text("device: [\n")
    assert "error" in live.reload()
    assert live.current.device.id == "pi-1"


def test_changed_keys_address_pipelines_by_name() -> None:
    from agent.config import parse_config

    a = parse_config(BASE)
    b = parse_config(apply_changes(BASE, {"pipelines.cam.top_k": 5}))
    assert changed_keys(a, b) == ["pipelines.cam.top_k"]


def save(tmp_path: Path, overrides: dict) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = state / OVERRIDES_FILE
    path.write_text(json.dumps(overrides))
    return path


def test_a_saved_override_that_no_longer_applies_is_dropped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline renamed in the file: its override goes, the agent still starts."""
    path = write(tmp_path, BASE)
    saved = save(tmp_path, {"pipelines.cam.threshold": 0.9, "pipelines.door.top_k": 5})
    with caplog.at_level(logging.WARNING, logger="agent.live"):
        live = LiveConfig.load(path)  # raised ConfigError (so `run` exited 2) before
    assert live.current.pipelines[0].threshold == 0.9
    assert live.warnings == [
        "saved override pipelines.door.top_k dropped: no pipeline named 'door'"
    ]
    assert "pipelines.door.top_k" in caplog.text
    # Rewritten without it, so the next start is quiet.
    assert json.loads(saved.read_text()) == {"pipelines.cam.threshold": 0.9}
    assert LiveConfig.load(path).warnings == []


def test_overrides_valid_only_together_are_kept_in_any_order(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    # mode rate alone is invalid (it needs max_per_s): key order must not matter.
    save(tmp_path, {"pipelines.cam.publish.mode": "rate", "pipelines.cam.publish.max_per_s": 4})
    effective = load_effective_config(path)
    assert effective.dropped == {}
    assert effective.config.pipelines[0].publish.max_per_s == 4


def test_an_unreadable_overrides_file_does_not_stop_start_up(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    saved = save(tmp_path, {})
    saved.write_text("{not json")
    live = LiveConfig.load(path)
    assert live.current.pipelines[0].threshold == 0.2
    assert len(live.warnings) == 1 and "saved overrides ignored" in live.warnings[0]
    assert json.loads(saved.read_text()) == {}


def test_loading_for_check_never_writes(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    saved = save(tmp_path, {"pipelines.door.top_k": 5})
    effective = load_effective_config(path)
    assert list(effective.dropped) == ["pipelines.door.top_k"]
    assert json.loads(saved.read_text()) == {"pipelines.door.top_k": 5}


def test_reload_after_a_rename_drops_the_stale_override(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    live.apply({"pipelines.cam.threshold": 0.9, "telemetry.interval_s": 5})
    renamed = {**BASE, "pipelines": [{**BASE["pipelines"][0], "name": "door"}]}
    write(tmp_path, renamed)
    outcome = live.reload()  # {"error": [...]} before: the override blocked every reload
    assert "error" not in outcome
    assert live.current.telemetry.interval_s == 5
    assert live.warnings == [
        "saved override pipelines.cam.threshold dropped: no pipeline named 'cam'"
    ]
    assert json.loads((tmp_path / "state" / OVERRIDES_FILE).read_text()) == {
        "telemetry.interval_s": 5
    }


def test_a_config_command_does_not_take_unreloaded_file_edits_along(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    write(tmp_path, {**BASE, "mqtt": {"host": "broker.lan"}})  # edited, no SIGHUP yet
    live.apply({"pipelines.cam.threshold": 0.5})
    assert live.current.mqtt.host == "localhost"
    assert live.current.pipelines[0].threshold == 0.5


# ----------------------------------------------------------- a real `edge-agent run`


def test_run_starts_with_a_stale_override_and_says_so_in_state(
    private_broker: Broker, tmp_path: Path
) -> None:
    """Before: exit status 2, which RestartPreventExitStatus=2 turns into a dead device."""
    data = {
        **BASE,
        "device": {"id": "ovr-1"},
        "mqtt": {"host": "127.0.0.1", "port": private_broker.port},
    }
    path = write(tmp_path, data)
    saved = save(tmp_path, {"pipelines.old-name.threshold": 0.5})
    collector = MessageCollector(private_broker, "edge/ovr-1/state")
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    try:
        # The warnings are known before the link starts: the first state carries them.
        try:
            first = collector.wait_for(1, timeout=60)[0]
        except AssertionError:
            raise AssertionError(f"no state; exit {proc.poll()}: {log.read_text()}") from None
        state = State.model_validate_json(first.payload)
        assert state.warnings == [
            "saved override pipelines.old-name.threshold dropped: no pipeline named 'old-name'"
        ]
        assert json.loads(saved.read_text()) == {}
        assert "WARNING agent.live: saved override pipelines.old-name.threshold" in log.read_text()
    finally:
        collector.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ------------------------------------------------------------------- live bounds


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("telemetry.interval_s", 1e30, "less than or equal to 3600"),  # silenced a device
        ("telemetry.interval_s", float("inf"), "finite number"),
        ("telemetry.interval_s", float("nan"), "finite number"),
        ("telemetry.interval_s", 0, "greater than or equal to 1"),
        ("telemetry.interval_s", True, "valid number"),
        ("pipelines.cam.threshold", 1.5, "less than or equal to 1"),
        ("pipelines.cam.threshold", -0.1, "greater than or equal to 0"),
        ("pipelines.cam.threshold", float("nan"), "finite number"),
        ("pipelines.cam.top_k", 0, "greater than or equal to 1"),
        ("pipelines.cam.top_k", 10**12, "less than or equal to 1000"),
        ("pipelines.cam.top_k", True, "valid integer"),
        ("pipelines.cam.publish.max_per_s", 1e9, "less than or equal to 1000"),
        ("pipelines.cam.publish.max_per_s", float("inf"), "finite number"),
        ("pipelines.cam.publish.score_delta", 0, "greater than 0"),
        ("pipelines.cam.publish.mode", "sometimes", "'every', 'rate' or 'change'"),
        ("log_level", "LOUD", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ],
)
def test_a_live_change_out_of_bounds_is_refused_in_one_line_and_changes_nothing(
    tmp_path: Path, key: str, value: object, reason: str
) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    live.apply({"pipelines.cam.threshold": 0.3})
    saved = (tmp_path / "state" / OVERRIDES_FILE).read_text()
    before = live.current
    control = AgentControl(None, {}, live)  # type: ignore[arg-type]  # config needs only live
    with pytest.raises(CommandFailed) as info:
        control.apply_config({key: value})
    assert info.value.code == ReplyCode.CONFIG_REJECTED
    message = info.value.message
    assert message.startswith(f"{key}: ") and reason in message and "\n" not in message
    assert live.current is before
    assert (tmp_path / "state" / OVERRIDES_FILE).read_text() == saved


def test_the_file_is_bounded_like_a_live_change(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "telemetry": {"interval_s": 1e30}})
    with pytest.raises(ConfigError, match=r"telemetry\.interval_s: .*less than or equal to 3600"):
        LiveConfig.load(path)
    path.write_text(path.read_text().replace("1.0e+30", ".inf"))
    with pytest.raises(ConfigError, match=r"telemetry\.interval_s: .*finite"):
        LiveConfig.load(path)


def test_a_saved_override_out_of_the_new_bounds_is_dropped(tmp_path: Path) -> None:
    """An override an older agent accepted (1e30) cannot keep telemetry silent."""
    path = write(tmp_path, BASE)
    save(tmp_path, {"telemetry.interval_s": 1e30})
    live = LiveConfig.load(path)
    assert live.current.telemetry.interval_s == 10
    assert live.warnings == [
        "saved override telemetry.interval_s dropped: Input should be less than or equal to 3600"
    ]


# ------------------------------------------------------------ untrusted keys


@pytest.mark.parametrize(
    "key",
    ["x\nFAKE", "pipelines.\ud800.threshold", "telemetry.\ud800", "\x1b[2J" * 1000, "\ud800"],
)
def test_a_hostile_key_is_refused_with_a_clean_one_line_message(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, BASE)
    live = LiveConfig.load(path)
    control = AgentControl(None, {}, live)  # type: ignore[arg-type]  # config needs only live
    with pytest.raises(CommandFailed) as info:
        control.apply_config({key: 0.5})
    message = info.value.message
    message.encode("utf-8")  # before: a lone surrogate made the reply unencodable
    assert "\n" not in message and "\x1b" not in message and len(message) < 1000
    assert info.value.code == ReplyCode.CONFIG_REJECTED
    assert not (tmp_path / "state" / OVERRIDES_FILE).exists()


def test_saving_overrides_never_fails_to_encode(tmp_path: Path) -> None:
    save_overrides(tmp_path, {"pipelines.cam.threshold": 0.5, "odd\ud800": "\udfff"})
    assert json.loads((tmp_path / OVERRIDES_FILE).read_text(encoding="ascii"))["odd\ud800"]
    with pytest.raises(ConfigError, match="cannot be saved"):
        save_overrides(tmp_path, {"telemetry.interval_s": float("nan")})


def test_many_bad_keys_get_a_short_answer() -> None:
    with pytest.raises(ConfigError) as info:
        apply_changes(BASE, {f"k{i}": 1 for i in range(10_000)})
    assert len(info.value.problems) == 6 and "9995 more" in info.value.problems[-1]
