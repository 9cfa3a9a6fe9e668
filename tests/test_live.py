"""Live config changes (the `config` command) and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError
from agent.config_changes import apply_changes, changed_keys, is_live_key
from agent.config_overrides import load_effective_config
from agent.live import LiveConfig

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
