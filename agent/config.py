"""The agent's configuration schema: pydantic models, and parsing data into them.

Every model forbids unknown keys so that a misspelled option is an error, not a
silently ignored line. ``parse_config`` turns every problem into a ``ConfigError``
whose lines each name the key path.

Reading the file is ``agent.config_loading``; the files a config names,
``agent.config_paths``; dotted-path (live) changes, ``agent.config_changes``; changes
saved across restarts, ``agent.config_overrides``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from agent.protocol import (
    DEFAULT_PREFIX,
    SAFE_ID_RE,
    DeviceId,
    GroupId,
    Name,
    validate_name,
    validation_problems,
)


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``path: reason`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    # inf and nan are never a setting: `1e400` in JSON or `.inf` in YAML is refused.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveFloat = Annotated[float, Field(gt=0)]
# Live keys (agent.config_changes.LIVE_KEYS) come from the network as well as the file:
# strict (true is not 1.0) and bounded, so no single change can silence a device.
MAX_TELEMETRY_INTERVAL_S = 3600.0
MAX_TOP_K = 1000
MAX_PUBLISH_PER_S = 1000.0
MAX_DRIFT_WINDOW = 20_000
# A raw output of this many values is about 40 KB of JSON per result: past it, a summary.
MAX_RAW_VALUES = 4096


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
    # Shadow evaluation, between validation and the swap (docs/model-health.md).
    shadow: bool = Field(
        default=True,
        description="run a new version beside the serving one on live frames before its swap",
    )
    min_agreement: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.96, description="least agreement with the serving version (a deploy may set it)"
    )
    max_distance: Annotated[float, Field(gt=0)] = Field(
        default=0.5, description="largest PSI of its live outputs from its manifest's reference"
    )
    shadow_frames: Annotated[int, Field(ge=1, le=100_000)] = 200
    shadow_timeout_s: PositiveFloat = 60.0


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
    kind: Literal["frames", "digits", "colors", "shapes", "windows"] = Field(
        default="frames",
        description="frames: moving gradients; digits: handwritten digits; colors: coloured "
        "patches in BGR (the colors example's scene); shapes: coloured squares on a grey "
        "background in BGR (the shapes detector's scene); windows: sensor windows",
    )
    width: Annotated[int, Field(gt=0)] = 224
    height: Annotated[int, Field(gt=0)] = 224
    channels: Literal[1, 3] = 3
    fps: PositiveFloat = 10.0
    seed: int = 0
    drift_after_s: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="seconds after the source opens when its scene changes, for drift tests "
        "(digits: inverted contrast; colors and shapes: a warm colour cast; frames: inverted; "
        "windows: louder and offset); none: never",
    )

    @model_validator(mode="after")
    def _colors_need_three_channels(self) -> SyntheticSource:
        if self.kind in ("colors", "shapes") and self.channels != 3:
            raise ValueError(f"kind '{self.kind}' needs channels 3")
        return self


class _AudioWindows(_Section):
    """Audio cut into fixed windows: ``window_s`` of samples every ``hop_s``."""

    sample_rate: Annotated[int, Field(ge=1000, le=192_000)] = 16000
    window_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    hop_s: Annotated[float, Field(gt=0, le=30)] = 0.25

    @model_validator(mode="after")
    def _hop_fits(self) -> _AudioWindows:
        if self.hop_s > self.window_s:
            raise ValueError("hop_s must not exceed window_s")
        if round(self.hop_s * self.sample_rate) < 1:
            raise ValueError("hop_s is shorter than one sample")
        return self


class MicrophoneSource(_AudioWindows):
    type: Literal["microphone"]
    device: int | str | None = Field(
        default=None, description="PortAudio device index or name (part of it); none: default"
    )
    channels: Literal[1] = 1


class WavSource(_AudioWindows):
    type: Literal["wav"]
    path: Path = Field(description="16-bit PCM WAV, mono or stereo, at sample_rate")
    loop: bool = True
    pace: Literal["native", "fast"] = "native"


SourceConfig: TypeAlias = Annotated[
    CameraSource
    | PiCamera2Source
    | VideoSource
    | ImagesSource
    | SensorSource
    | SyntheticSource
    | MicrophoneSource
    | WavSource,
    Field(discriminator="type"),
]


class PublishConfig(_Section):
    mode: Literal["every", "rate", "change"] = "every"
    max_per_s: Annotated[float, Field(strict=True, gt=0, le=MAX_PUBLISH_PER_S)] | None = None
    score_delta: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _rate_needs_limit(self) -> PublishConfig:
        if self.mode == "rate" and self.max_per_s is None:
            raise ValueError("mode 'rate' needs max_per_s")
        return self


class DriftConfig(_Section):
    """Output drift of the served model against its manifest's reference statistics."""

    enabled: Annotated[bool, Field(strict=True)] = True
    window: Annotated[int, Field(strict=True, ge=10, le=MAX_DRIFT_WINDOW)] = Field(
        default=500, description="frames in the sliding window"
    )
    min_frames: Annotated[int, Field(strict=True, ge=1, le=MAX_DRIFT_WINDOW)] = Field(
        default=100, description="no distance from fewer frames (sampling noise)"
    )
    threshold: Annotated[float, Field(strict=True, gt=0, le=10)] = Field(
        default=0.25, description="PSI above which state carries a drift warning"
    )

    @model_validator(mode="after")
    def _min_frames_fit(self) -> DriftConfig:
        if self.min_frames > self.window:
            raise ValueError("min_frames must not exceed window")
        return self


class CaptureConfig(_Section):
    """Frames worth labelling: the least confident ones, kept on disk within a budget."""

    enabled: bool = False
    max_mb: Annotated[float, Field(gt=0, le=100_000)] = Field(
        default=50.0, description="disk budget of the kept frames and their sidecars"
    )
    max_frames: Annotated[int, Field(ge=1, le=100_000)] = 200
    below: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5,
        description="a frame is a candidate when its top confidence is below this "
        "(classify: top-1 probability; detect: best score, or no detection at all)",
    )
    min_interval_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=1.0, description="at most one frame kept per interval (the least confident)"
    )
    format: Literal["jpeg", "npy"] = Field(
        default="jpeg",
        description="jpeg: JPEG through OpenCV for 8-bit images when OpenCV is installed, "
        "else .npy; npy: always .npy (lossless)",
    )


class KeywordConfig(_Section):
    """Keyword spotting (task keyword): when a window's keyword is published."""

    refractory_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=1.0, description="the same keyword is not published again within this"
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["_silence_", "_unknown_"],
        description="labels that never fire (background classes)",
    )


class RawConfig(_Section):
    """Task ``raw``: how much of each output tensor a result carries."""

    max_values: Annotated[int, Field(strict=True, ge=0, le=MAX_RAW_VALUES)] = Field(
        default=64,
        description="an output with at most this many values is published whole; a larger "
        "one as its shape, min, max, mean and argmax",
    )


class SegmentConfig(_Section):
    """What a ``segment`` model's per-pixel map becomes in each result (never the map)."""

    mask_size: Annotated[int, Field(strict=True, ge=4, le=128)] | None = Field(
        default=None,
        description="longer side of the run-length-encoded class mask in the result; "
        "none: no mask (areas and regions only)",
    )
    min_region_area: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.01,
        description="classes and regions smaller than this fraction of the frame are not reported",
    )
    max_regions: Annotated[int, Field(strict=True, ge=0, le=256)] = Field(
        default=16, description="largest connected regions reported per result"
    )
    background: Annotated[int, Field(strict=True, ge=0)] | None = Field(
        default=0, description="class index never reported as regions; none: every class"
    )


class PipelineConfig(_Section):
    name: Name
    model: Name = Field(description="model name in the store; deploys of that name update it")
    source: SourceConfig
    resize: Literal["stretch", "letterbox"] = "stretch"
    top_k: Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K)] = 3
    threshold: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.0
    publish: PublishConfig = PublishConfig()
    queue: Literal["latest", "fifo"] = Field(
        default="latest", description="latest: drop stale camera frames; fifo: sensors"
    )
    drift: DriftConfig = DriftConfig()
    capture: CaptureConfig = CaptureConfig()
    keyword: KeywordConfig = KeywordConfig()
    raw: RawConfig = RawConfig()
    segment: SegmentConfig = SegmentConfig()


# ----------------------------------------------------------------------- ops, root


class TelemetryConfig(_Section):
    interval_s: Annotated[float, Field(strict=True, ge=1, le=MAX_TELEMETRY_INTERVAL_S)] = 10.0


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
    deadline_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        default=1800.0, description="a deploy's whole download or chunk transfer, at most"
    )


def _check_discovery_prefix(value: str) -> str:
    for part in value.split("/"):
        if not SAFE_ID_RE.match(part):
            raise ValueError(
                f"discovery prefix segment {part!r} may hold only letters, digits, "
                "'.', '_' and '-' (no '+', '#', empty segments)"
            )
    return value


class HomeAssistantConfig(_Section):
    """MQTT discovery for Home Assistant (docs/integrations.md)."""

    enabled: bool = Field(
        default=False,
        description="announce the device to Home Assistant; false removes what an earlier "
        "run announced",
    )
    discovery_prefix: Annotated[str, AfterValidator(_check_discovery_prefix)] = Field(
        default="homeassistant", description="Home Assistant's discovery prefix"
    )
    name: Annotated[str, Field(min_length=1, max_length=100)] | None = Field(
        default=None, description="the device's name in Home Assistant; default: the device id"
    )
    buttons: bool = Field(
        default=True,
        description="ping and per-pipeline restart buttons (not offered when "
        "mqtt.require_signed_commands is on: Home Assistant cannot sign)",
    )


class IntegrationsConfig(_Section):
    home_assistant: HomeAssistantConfig = HomeAssistantConfig()


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
    integrations: IntegrationsConfig = IntegrationsConfig()

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


# ------------------------------------------------------------------------ parsing


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


def pipeline_key(names: Sequence[object], index: int) -> str:
    """How a key path names pipeline ``index`` of those named ``names``: by its name.

    The ``config`` command addresses pipelines by name (``pipelines.door-cam.top_k``),
    so problems name them the same way. The position stays only when the name cannot
    say which pipeline: missing, invalid, shared with another, or holding a '.' (which
    would split the dotted key).
    """
    name = names[index] if 0 <= index < len(names) else None
    if not isinstance(name, str) or "." in name or names.count(name) != 1:
        return str(index)
    try:
        validate_name(name)
    except ValueError:
        return str(index)
    return name


def _by_name(path: str, data: dict[str, Any]) -> str:
    """A problem's ``pipelines.<i>…`` path as ``pipelines.<name>…`` (see ``pipeline_key``)."""
    first, _, rest = path.partition(".")
    index, dot, tail = rest.partition(".")
    pipelines = data.get("pipelines")
    if first != "pipelines" or not index.isdigit() or not isinstance(pipelines, list):
        return path
    names = [p.get("name") if isinstance(p, dict) else None for p in pipelines]
    return f"pipelines.{pipeline_key(names, int(index))}{dot}{tail}"


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
            lines.append(f"{_by_name(path, data)}: {msg}")
        raise ConfigError(lines) from None
