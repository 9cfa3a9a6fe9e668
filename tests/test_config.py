from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError
from agent.config_loading import load_config
from agent.config_paths import check_files

ROOT = Path(__file__).resolve().parent.parent
# The agent's configs (fleet-server.example.yaml is the server's: tests/server/test_service.py).
CONFIGS = sorted((ROOT / "configs").glob("agent*.yaml"))
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGE_AGENT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SERIAL_WITHOUT_PORT = {"type": "sensor", "input": "serial", "window": 4}
MINIMAL = {"device": {"id": "pi-1"}, "models": {"require_signature": False}}


@pytest.mark.parametrize("path", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_loads_and_names_existing_files(path: Path) -> None:
    config = load_config(path)
    assert check_files(config) == []


def test_shipped_configs_exist() -> None:
    assert {"agent.example.yaml", "agent.minimal.yaml"} <= {c.name for c in CONFIGS}


def test_example_documents_every_option() -> None:
    """Every key of every config section appears in the commented example."""
    from agent import config as c

    text = (ROOT / "configs/agent.example.yaml").read_text()
    sections = [
        c.AgentConfig, c.DeviceConfig, c.MqttConfig, c.TlsConfig, c.ReconnectConfig,
        c.RuntimeConfig, c.ModelsConfig, c.ValidationConfig, c.ProbationConfig,
        c.DownloadConfig, c.PipelineConfig, c.PublishConfig, c.DriftConfig, c.CaptureConfig,
        c.RawConfig,
        c.SegmentConfig,
        c.TelemetryConfig,
        c.HttpApiConfig, c.OutboxConfig, c.TransferConfig, c.CameraSource, c.PiCamera2Source,
        c.VideoSource,
        c.ImagesSource, c.SensorSource, c.SyntheticSource, c.MicrophoneSource, c.WavSource,
        c.KeywordConfig, c.IntegrationsConfig, c.HomeAssistantConfig,
    ]  # fmt: skip
    missing = [
        f"{s.__name__}.{name}"
        for s in sections
        for name in s.model_fields
        if f"{name}:" not in text
    ]
    assert missing == []


def test_cli_check_offline_accepts_the_example() -> None:
    result = run_agent("check", "configs/agent.example.yaml", "--offline")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_cli_check_names_a_misspelled_key(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs/agent.example.yaml").read_text())
    data["mqtt"]["keeplive_s"] = data["mqtt"].pop("keepalive_s")
    data["pipelines"][0]["source"]["fpz"] = data["pipelines"][0]["source"].pop("fps")
    data["models"]["trusted_keys"] = [str(ROOT / "configs/keys/example.pub")]
    data["pipelines"][1]["source"]["path"] = str(ROOT / "configs/samples/vibration.csv")
    result = run_agent("check", str(write(tmp_path, data)), "--offline")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "mqtt.keeplive_s: unknown key (did you mean 'keepalive_s'?)",
        "pipelines.door-cam.source.fpz: unknown key (did you mean 'fps'?)",
    ]


def test_missing_ca_file_is_named_with_its_key_path(tmp_path: Path) -> None:
    data = {**MINIMAL, "mqtt": {"tls": {"enabled": True, "ca_file": "nope/ca.pem"}}}
    result = run_agent("check", str(write(tmp_path, data)), "--offline")
    assert result.returncode == 2
    assert result.stderr.startswith("mqtt.tls.ca_file: file not found:")
    assert str(tmp_path / "nope/ca.pem") in result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"device": {"id": "a/b"}}, "device.id:"),
        ({"device": {}}, "device.id: required key missing"),
        ({"mqtt": {"port": 0}}, "mqtt.port:"),
        ({"mqtt": {"password": "x", "password_env": "Y"}}, "give only one of password"),
        ({"models": {}}, "models.trusted_keys is empty"),
        ({"runtime": {"delegate": "external"}}, "delegate 'external' needs delegate_path"),
        (
            {"pipelines": [{"name": "a", "model": "m", "source": {"type": "webcam"}}]},
            "pipelines.a.source:",
        ),
        (
            {"pipelines": [{"name": "a", "model": "m", "source": SERIAL_WITHOUT_PORT}]},
            "input 'serial' needs port",
        ),
        (
            {"pipelines": [
                {"name": "a", "model": "m", "source": {"type": "synthetic"}},
                {"name": "a", "model": "n", "source": {"type": "synthetic"}},
            ]},
            "pipeline names must be unique: a",
        ),
    ],
)  # fmt: skip
def test_invalid_values_name_the_problem(tmp_path: Path, change: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**MINIMAL, **change}))
    assert expected in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device:\n  id: pi-1\nmqtt: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML" in str(info.value)
    assert "line" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_agent("check", str(tmp_path / "none.yaml"), "--offline")
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("x")
    config = load_config(
        write(tmp_path, {"device": {"id": "pi-1"}, "models": {"trusted_keys": ["k.pub"]}})
    )
    assert config.models.trusted_keys == [tmp_path / "k.pub"]


def test_yaml_integer_protocol_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {**MINIMAL, "mqtt": {"protocol": 5}}))
    assert config.mqtt.protocol == "5"


def test_schema_command_prints_every_message() -> None:
    import json

    result = run_agent("schema")
    assert result.returncode == 0
    assert set(json.loads(result.stdout)) == {
        "Command", "Reply", "State", "Telemetry", "Result", "Chunk", "ChunkRequest",
    }  # fmt: skip
    assert run_agent("schema", "--message", "Nope").returncode == 2


def _pipeline(name: object, **extra: object) -> dict[str, object]:
    return {"name": name, "model": "m", "source": {"type": "synthetic"}, **extra}


def test_a_problem_in_a_pipeline_names_it_as_the_config_command_does(tmp_path: Path) -> None:
    """``pipelines.face.top_k``, the key a ``config`` command uses, not ``pipelines.1.top_k``."""
    pipelines = [_pipeline("door"), _pipeline("face", top_k=0, publish={"mode": "rate"})]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**MINIMAL, "pipelines": pipelines}))
    assert sorted(info.value.problems) == [
        "pipelines.face.publish: mode 'rate' needs max_per_s",
        "pipelines.face.top_k: Input should be greater than or equal to 1",
    ]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a", None], "pipelines.1.name: required key missing"),  # no name to name it by
        (["a", "b/c"], "pipelines.1.name: name 'b/c' may hold only"),  # not a valid name
        (["a", "x.y"], "pipelines.1.top_k:"),  # a dot would split the key
    ],
)
def test_a_pipeline_without_a_usable_name_is_named_by_position(
    tmp_path: Path, names: list[object], expected: str
) -> None:
    pipelines = [_pipeline(n, top_k=0 if n == "x.y" else 3) for n in names]
    for p in pipelines:
        if p["name"] is None:
            del p["name"]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**MINIMAL, "pipelines": pipelines}))
    assert any(line.startswith(expected) for line in info.value.problems), info.value.problems


def test_pipelines_sharing_a_name_are_named_by_position(tmp_path: Path) -> None:
    pipelines = [_pipeline("a"), _pipeline("a", top_k=0)]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**MINIMAL, "pipelines": pipelines}))
    assert info.value.problems[0].startswith("pipelines.1.top_k: ")


def test_a_missing_source_file_names_its_pipeline(tmp_path: Path) -> None:
    video = {"type": "video", "path": "clips/door.mp4"}
    pipelines = [_pipeline("main"), {**_pipeline("door"), "source": video}]
    config = load_config(write(tmp_path, {**MINIMAL, "pipelines": pipelines}))
    assert check_files(config) == [
        f"pipelines.door.source.path: file not found: {tmp_path / 'clips/door.mp4'}"
    ]
