"""Live config changes (the `config` command) and reloads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError
from agent.config_changes import apply_changes, changed_keys, is_live_key
from agent.config_overrides import OVERRIDES_FILE, load_effective_config
from agent.live import LiveConfig
from agent.protocol import State
from tests.mqtt_support import Broker, MessageCollector, Received

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
    assert live.warnings == ["saved override pipelines.door.top_k dropped: no pipeline named 'door'"]
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

        def warned(messages: list[Received]) -> bool:
            return any(State.model_validate_json(m.payload).warnings for m in messages)

        try:
            collector.wait_for(1, timeout=60)
            deadline = time.monotonic() + 60
            while not warned(collector.messages) and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                collector.wait_for(len(collector.messages) + 1, timeout=5)
        except AssertionError:
            raise AssertionError(f"no state with warnings; exit {proc.poll()}: {log.read_text()}")
        state = next(
            s
            for s in (State.model_validate_json(m.payload) for m in collector.messages)
            if s.warnings
        )
        assert state.warnings == [
            "saved override pipelines.old-name.threshold dropped: no pipeline named 'old-name'"
        ]
        assert json.loads(saved.read_text()) == {}
        assert "WARNING agent.live: saved override pipelines.old-name.threshold" in log.read_text()
    finally:
        collector.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
