"""The agent's configuration: pydantic models loaded from YAML.

Every model forbids unknown keys so that a misspelled option is an error, not a
silently ignored line. ``load_config`` turns every problem into a ``ConfigError``
whose lines each name the key path.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.protocol import (
    DEFAULT_PREFIX,
    DeviceId,
    GroupId,
    Name,
    validation_problems,
)


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``path: reason`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveFloat = Annotated[float, Field(gt=0)]


# ------------------------------------------------------------------------------ mqtt


class TlsConfig(_Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = Field(default=None, description="client certificate for mTLS")
    key_file: Path | None = None
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _cert_needs_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class ReconnectConfig(_Section):
    min_delay_s: PositiveFloat = 1.0
    max_delay_s: PositiveFloat = 60.0


class MqttConfig(_Section):
    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: Annotated[int, Field(ge=5, le=65535)] = 30
    topic_prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = Field(default=None, description="prefer password_file or password_env")
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig = TlsConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    session_expiry_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    require_signed_commands: bool = False
    command_keys: list[Path] = Field(
        default_factory=list, description="Ed25519 public keys that may sign commands"
    )
    command_max_age_s: PositiveFloat = Field(
        default=300.0, description="signed commands: allowed clock difference"
    )
    reply_topics: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        default=None,
        description=(
            "MQTT topic filters a command's response topic must match; default: the "
            "device's own reply topic and <prefix>/replies/#"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _protocol_as_text(cls, data: Any) -> Any:
        # YAML reads `protocol: 5` as an int; accept it.
        if isinstance(data, dict) and isinstance(data.get("protocol"), int | float):
            data = {**data, "protocol": str(data["protocol"])}
        return data

    @model_validator(mode="after")
    def _signed_commands_need_keys(self) -> MqttConfig:
        if self.require_signed_commands and not self.command_keys:
            raise ValueError("require_signed_commands needs command_keys")
        return self

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        given = [k for k in ("password", "password_file", "password_env") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        return self


# ------------------------------------------------------------------ runtime, models


class RuntimeConfig(_Section):
    prefer: Literal["auto", "ai_edge_litert", "tflite_runtime", "tensorflow"] = "auto"
    num_threads: Annotated[int, Field(ge=1, le=64)] = 2
    delegate: Literal["cpu", "edgetpu", "external"] = Field(
        default="cpu", description="cpu = the runtime's default XNNPACK path"
    )
    delegate_path: Path | None = None
    delegate_options: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _external_needs_path(self) -> RuntimeConfig:
        if self.delegate == "external" and self.delegate_path is None:
            raise ValueError("delegate 'external' needs delegate_path")
        return self


class ValidationConfig(_Section):
    timeout_s: PositiveFloat = 60.0
    memory_mb: Annotated[int, Field(ge=32)] = 1024


class ProbationConfig(_Section):
    duration_s: Annotated[float, Field(ge=0)] = 30.0
    min_inferences: Annotated[int, Field(ge=0)] = 20
    max_latency_ratio: Annotated[float, Field(gt=1)] = 2.0


class DownloadConfig(_Section):
    timeout_s: PositiveFloat = 120.0
    max_bytes: Annotated[int, Field(gt=0)] = 512 * 1024 * 1024


class ModelsConfig(_Section):
    require_signature: bool = True
    trusted_keys: list[Path] = Field(default_factory=list, description="Ed25519 public keys")
    keep_versions: Annotated[int, Field(ge=1)] = 3
    validation: ValidationConfig = ValidationConfig()
    probation: ProbationConfig = ProbationConfig()
    download: DownloadConfig = DownloadConfig()


# ------------------------------------------------------------------------- sources


class CameraSource(_Section):
    type: Literal["camera"]
    device: int | str = Field(
        default=0, description="index, /dev/videoN, rtsp:// or http:// URL, or GStreamer pipeline"
    )
    width: Annotated[int, Field(gt=0)] | None = None
    height: Annotated[int, Field(gt=0)] | None = None
    fps: PositiveFloat | None = None


class PiCamera2Source(_Section):
    type: Literal["picamera2"]
    width: Annotated[int, Field(gt=0)] = 640
    height: Annotated[int, Field(gt=0)] = 480
    fps: PositiveFloat | None = None


class VideoSource(_Section):
    type: Literal["video"]
    path: Path
    loop: bool = True
    pace: Literal["native", "fast"] = "native"


class ImagesSource(_Section):
    type: Literal["images"]
    path: Path
    loop: bool = True
    fps: PositiveFloat | None = None


class SensorSource(_Section):
    type: Literal["sensor"]
    input: Literal["serial", "file", "stdin"]
    port: str | None = Field(default=None, description="serial device, e.g. /dev/ttyUSB0")
    baudrate: Annotated[int, Field(gt=0)] = 115200
    path: Path | None = Field(default=None, description="CSV or JSONL to replay")
    rate_hz: PositiveFloat | None = Field(default=None, description="replay pace")
    columns: list[str] | None = None
    window: Annotated[int, Field(gt=0)]
    hop: Annotated[int, Field(gt=0)] = 1

    @model_validator(mode="after")
    def _input_needs_its_key(self) -> SensorSource:
        if self.input == "serial" and not self.port:
            raise ValueError("input 'serial' needs port")
        if self.input == "file" and self.path is None:
            raise ValueError("input 'file' needs path")
        return self


class SyntheticSource(_Section):
    type: Literal["synthetic"]
    kind: Literal["frames", "digits", "windows"] = "frames"
    width: Annotated[int, Field(gt=0)] = 224
    height: Annotated[int, Field(gt=0)] = 224
    channels: Literal[1, 3] = 3
    fps: PositiveFloat = 10.0
    seed: int = 0


SourceConfig: TypeAlias = Annotated[
    CameraSource | PiCamera2Source | VideoSource | ImagesSource | SensorSource | SyntheticSource,
    Field(discriminator="type"),
]


class PublishConfig(_Section):
    mode: Literal["every", "rate", "change"] = "every"
    max_per_s: PositiveFloat | None = None
    score_delta: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _rate_needs_limit(self) -> PublishConfig:
        if self.mode == "rate" and self.max_per_s is None:
            raise ValueError("mode 'rate' needs max_per_s")
        return self


class PipelineConfig(_Section):
    name: Name
    model: Name = Field(description="model name in the store; deploys of that name update it")
    source: SourceConfig
    resize: Literal["stretch", "letterbox"] = "stretch"
    top_k: Annotated[int, Field(ge=1)] = 3
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.0
    publish: PublishConfig = PublishConfig()
    queue: Literal["latest", "fifo"] = Field(
        default="latest", description="latest: drop stale camera frames; fifo: sensors"
    )


# ----------------------------------------------------------------------- ops, root


class TelemetryConfig(_Section):
    interval_s: Annotated[float, Field(ge=1)] = 10.0


class HttpApiConfig(_Section):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 9470
    metrics: bool = Field(
        default=True, description="GET /metrics in Prometheus' format (needs prometheus-client)"
    )


class OutboxConfig(_Section):
    max_messages: Annotated[int, Field(gt=0)] = 100_000
    max_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    max_age_s: PositiveFloat = Field(
        default=7 * 24 * 3600.0, description="older queued messages are dropped (and counted)"
    )
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=256, description="published but not yet acknowledged (PUBACK) at once"
    )


Scheme: TypeAlias = Literal["https", "http", "file"]
_DEFAULT_SCHEMES: tuple[Scheme, ...] = ("https", "http")


class TransferConfig(_Section):
    """How model files reach the device; size cap and timeout are models.download."""

    allowed_schemes: list[Scheme] = Field(default_factory=lambda: list(_DEFAULT_SCHEMES))
    allowed_hosts: list[str] = Field(
        default_factory=list, description="URL hosts a device may fetch from; empty = any"
    )
    resume_attempts: Annotated[int, Field(ge=0)] = Field(
        default=5, description="HTTP Range resumes after an interrupted download"
    )
    chunk_wait_s: PositiveFloat = Field(
        default=10.0, description="MQTT transfer: silence before missing chunks are requested"
    )
    chunk_requests: Annotated[int, Field(ge=1)] = Field(
        default=6, description="MQTT transfer: requests for missing chunks before giving up"
    )


class DeviceConfig(_Section):
    id: DeviceId
    groups: list[GroupId] = Field(default_factory=list)


class AgentConfig(_Section):
    device: DeviceConfig
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: LEVEL logger: message; json: one object per line"
    )
    mqtt: MqttConfig = MqttConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    models: ModelsConfig = ModelsConfig()
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    telemetry: TelemetryConfig = TelemetryConfig()
    http: HttpApiConfig = HttpApiConfig()
    outbox: OutboxConfig = OutboxConfig()
    transfer: TransferConfig = TransferConfig()

    @model_validator(mode="after")
    def _signing_keys(self) -> AgentConfig:
        # Checked here rather than in ModelsConfig so the message can name the key path.
        if self.models.require_signature and not self.models.trusted_keys:
            raise ValueError(
                "models.trusted_keys is empty but models.require_signature is true "
                "(the default): list the fleet's public keys, or set require_signature: false"
            )
        return self

    @model_validator(mode="after")
    def _unique_pipeline_names(self) -> AgentConfig:
        names = [p.name for p in self.pipelines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipeline names must be unique: {', '.join(dupes)}")
        return self


# ------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names at ``path`` inside ``model`` (best effort, for did-you-mean hints)."""
    current: list[type[BaseModel]] = [model]
    for step in path:
        if step.isdigit():
            continue
        found: list[type[BaseModel]] = []
        for m in current:
            field = m.model_fields.get(step)
            if field is None:
                continue
            annotation = field.annotation
            for a in (annotation, *getattr(annotation, "__args__", ())):
                if isinstance(a, type) and issubclass(a, BaseModel):
                    found.append(a)
        current = found
    return sorted({name for m in current for name in m.model_fields})


def parse_config(data: Any, source: str = "config") -> AgentConfig:
    """Validate already-loaded YAML data; raises ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: top level must be a mapping of keys"])
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for path, msg in validation_problems(err, data):
            if msg == "unknown key":
                *parent, key = path.split(".")
                hints = difflib.get_close_matches(
                    key, _known_keys(AgentConfig, parent), n=1, cutoff=0.6
                )
                if hints:
                    msg = f"unknown key (did you mean {hints[0]!r}?)"
            elif msg.startswith("Value error, "):
                msg = msg.removeprefix("Value error, ")
            lines.append(f"{path}: {msg}")
        raise ConfigError(lines) from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a YAML config file; raises ``ConfigError``.

    Relative file paths inside the config are taken relative to the config file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{p}:{where}: invalid YAML: {problem}"]) from None
    config = parse_config(data if data is not None else {}, str(p))
    return _resolve_paths(config, p.parent.resolve())


def _path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str]]:
    """Every (key path, owning model, field name) whose value is a Path or list of Paths."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _path_fields(value, f"{path}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for i, item in enumerate(value):
                yield from _path_fields(item, f"{path}.{i}.")
        elif isinstance(value, Path) or (
            isinstance(value, list) and value and isinstance(value[0], Path)
        ):
            yield path, model, name


def _resolve_paths(config: AgentConfig, base: Path) -> AgentConfig:
    for _path, owner, name in _path_fields(config):
        value = getattr(owner, name)
        if isinstance(value, list):
            setattr(owner, name, [v if v.is_absolute() else base / v for v in value])
        elif not value.is_absolute():
            setattr(owner, name, base / value)
    return config


# Files the agent reads at start-up; state_dir is created by the agent (or systemd).
_MUST_EXIST = {
    "mqtt.tls.ca_file",
    "mqtt.tls.cert_file",
    "mqtt.tls.key_file",
    "mqtt.password_file",
    "mqtt.command_keys",
    "models.trusted_keys",
    "runtime.delegate_path",
}


def check_files(config: AgentConfig) -> list[str]:
    """Problems with files the config names, without touching network or hardware."""
    problems = []
    for path, owner, name in _path_fields(config):
        generic = ".".join(p for p in path.split(".") if not p.isdigit())
        value = getattr(owner, name)
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            where = f"{path}.{i}" if isinstance(value, list) else path
            source_file = generic in ("pipelines.source.path",)
            if generic in _MUST_EXIST or source_file:
                if not v.exists():
                    problems.append(f"{where}: file not found: {v}")
                elif generic != "pipelines.source.path" and not os.access(v, os.R_OK):
                    problems.append(f"{where}: file not readable: {v}")
    if config.mqtt.password_env and config.mqtt.password_env not in os.environ:
        problems.append(
            f"mqtt.password_env: environment variable {config.mqtt.password_env} is not set"
        )
    return problems


# ------------------------------------------------------------------- live changes

# What the `config` command and a SIGHUP may change without a restart. Pipelines are
# addressed by name: `pipelines.<name>.threshold`.
LIVE_KEYS = (
    "log_level",
    "telemetry.interval_s",
    "pipelines.*.threshold",
    "pipelines.*.top_k",
    "pipelines.*.publish.mode",
    "pipelines.*.publish.max_per_s",
    "pipelines.*.publish.score_delta",
)
OVERRIDES_FILE = "config-overrides.json"


def is_live_key(key: str) -> bool:
    """Whether a dotted key (pipelines by name) may change without a restart."""
    parts = key.split(".")
    for pattern in LIVE_KEYS:
        want = pattern.split(".")
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts, strict=True)):
            return True
    return False


def config_from_data(data: dict[str, Any], path: str | os.PathLike[str]) -> AgentConfig:
    """Validate raw data read from ``path``, resolving relative paths against its folder."""
    return _resolve_paths(parse_config(data, str(path)), Path(path).parent.resolve())


def apply_changes(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of raw config ``data`` with dotted ``changes`` applied; only live keys.

    Raises ``ConfigError`` naming every key that is unknown or needs a restart, and
    every value the resulting config rejects.
    """
    import copy

    new = copy.deepcopy(data)
    problems = []
    for key, value in changes.items():
        if not is_live_key(key):
            problems.append(
                f"{key}: cannot change live (live keys: {', '.join(LIVE_KEYS)}); "
                "edit the config file and restart"
            )
            continue
        parts = key.split(".")
        node: Any = new
        if parts[0] == "pipelines":
            match = [p for p in new.get("pipelines") or [] if p.get("name") == parts[1]]
            if not match:
                problems.append(f"{key}: no pipeline named {parts[1]!r}")
                continue
            node, parts = match[0], parts[2:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    parse_config(new)
    return new


def load_overrides(state_dir: Path) -> dict[str, Any]:
    import json

    path = state_dir / OVERRIDES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: unreadable overrides: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: overrides must be a JSON object"])
    return data


def save_overrides(state_dir: Path, overrides: dict[str, Any]) -> None:
    """Written atomically: a crash leaves the old file or the new one, never half."""
    import json
    import tempfile

    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".overrides.", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(overrides, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / OVERRIDES_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config file's YAML data (no validation); raises ``ConfigError``."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: invalid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping of keys"])
    return data


def load_effective_config(path: str | os.PathLike[str]) -> AgentConfig:
    """The config file with the persisted live changes (``config`` commands) applied."""
    config = load_config(path)
    overrides = load_overrides(config.state_dir)
    if not overrides:
        return config
    try:
        data = apply_changes(read_raw(path), overrides)
    except ConfigError as err:
        # A file edit can make an old override invalid: the file wins, and says so.
        raise ConfigError(
            [f"{config.state_dir / OVERRIDES_FILE}: {line}" for line in err.problems]
        ) from None
    return config_from_data(data, path)
