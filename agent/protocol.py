"""The wire protocol between devices and fleet consoles: topics and message models.

This module is the one definition of the protocol. The agent and the fleet console
both import it; a console in another language follows ``docs/protocol.md`` and the
JSON Schemas printed by ``edge-agent schema``.

Topics, under a configurable prefix (default ``edge``):

=====================================  =====  ======  ===================================
topic                                  QoS    retain  payload
=====================================  =====  ======  ===================================
``<prefix>/<device>/cmd``              1      no      a command (``Command``)
``<prefix>/group/<group>/cmd``         1      no      a command for every member
``<prefix>/<device>/reply``            1      no      ``Reply`` (MQTT 5: the response topic)
``<prefix>/<device>/state``            1      yes     ``State``; the last will says offline
``<prefix>/<device>/telemetry``        1      no      ``Telemetry``
``<prefix>/<device>/results/<pipe>``   1      no      ``Result``
``<prefix>/transfer/<transfer_id>``    1      no      ``Chunk`` (model bytes over MQTT)
``<prefix>/transfer/<id>/missing``     1      no      ``ChunkRequest`` (device asks again)
=====================================  =====  ======  ===================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal, Protocol, TypeAlias, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "edge"

# A command carries a manifest but never model bytes, so it stays small; anything
# larger is refused before it is parsed.
MAX_COMMAND_BYTES = 256 * 1024
MAX_ID_LENGTH = 64

# Second-level topic words that cannot be device ids, or their topics would collide.
RESERVED_DEVICE_IDS = frozenset({"group", "transfer"})

# The one pattern for ids and names that become topic words or directory names
# (the model store imports it): no '/', '+', '#', no leading '.'.
SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# JSON nested deeper than this is refused before it is parsed: the parser recurses
# per level, and no message of the protocol needs more than a handful of levels.
MAX_JSON_DEPTH = 32


class CommandFailed(Exception):
    """Raised by whatever executes a command; becomes a ``failed`` reply with this code."""

    def __init__(self, code: ReplyCode, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class ProtocolError(CommandFailed, ValueError):
    """A payload or identifier that does not follow the protocol."""


# The stages a long command reports in its ``progress`` replies, in the order a deploy
# goes through them (a rollback: validating, swapping). The one list: the type makes
# mypy refuse any other name at the places that report one, and docs/protocol.md must
# describe each (tests/test_protocol_doc.py).
Stage: TypeAlias = Literal[
    "downloading", "receiving", "installing", "validating", "shadow", "swapping", "probation"
]
STAGES: tuple[Stage, ...] = get_args(Stage)
# Stages whose progress replies carry ``percent``; the others send it only as null.
STAGES_WITH_PERCENT: tuple[Stage, ...] = ("downloading", "receiving", "shadow")


class Progress(Protocol):
    """Reports progress of a long command: (stage, percent or None), e.g.
    ("downloading", 42.0); ``data`` (optional) rides in the progress reply, e.g. the
    running figures of the ``shadow`` stage."""

    def __call__(
        self, stage: Stage, percent: float | None, data: dict[str, Any] | None = None
    ) -> None: ...


def _check_id(value: str, what: str, max_len: int = MAX_ID_LENGTH) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    if not SAFE_ID_RE.match(value):
        raise ValueError(
            f"{what} {value!r} may hold only letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit (no '/', '+', '#')"
        )
    return value


def validate_device_id(value: str) -> str:
    _check_id(value, "device id")
    if value in RESERVED_DEVICE_IDS:
        raise ValueError(f"device id {value!r} is reserved")
    return value


def validate_group_id(value: str) -> str:
    return _check_id(value, "group id")


def validate_name(value: str) -> str:
    """Model and pipeline names, and versions: they become directory names on the device."""
    return _check_id(value, "name", max_len=128)


DeviceId = Annotated[str, AfterValidator(validate_device_id)]
GroupId = Annotated[str, AfterValidator(validate_group_id)]
Name = Annotated[str, AfterValidator(validate_name)]
CommandId = Annotated[str, AfterValidator(lambda v: _check_id(v, "command id"))]


# ---------------------------------------------------------------------------- topics


class Topics:
    """Topic builders and parsers for one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        parts = prefix.split("/")
        for part in parts:
            _check_id(part, "topic prefix segment")
        self.prefix = prefix
        self._depth = len(parts)

    def cmd(self, device: str) -> str:
        return f"{self.prefix}/{validate_device_id(device)}/cmd"

    def group_cmd(self, group: str) -> str:
        return f"{self.prefix}/group/{validate_group_id(group)}/cmd"

    def reply(self, device: str) -> str:
        return f"{self.prefix}/{validate_device_id(device)}/reply"

    def state(self, device: str) -> str:
        return f"{self.prefix}/{validate_device_id(device)}/state"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/{validate_device_id(device)}/telemetry"

    def results(self, device: str, pipeline: str) -> str:
        return f"{self.prefix}/{validate_device_id(device)}/results/{validate_name(pipeline)}"

    def transfer(self, transfer_id: str) -> str:
        return f"{self.prefix}/transfer/{_check_id(transfer_id, 'transfer id')}"

    def transfer_missing(self, transfer_id: str) -> str:
        """Where devices ask for chunks again; the sending console subscribes to it."""
        return f"{self.transfer(transfer_id)}/missing"

    # Wildcard subscriptions for a console that watches the whole fleet.
    def all_states(self) -> str:
        return f"{self.prefix}/+/state"

    def all_replies(self) -> str:
        return f"{self.prefix}/+/reply"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/+/telemetry"

    def all_results(self) -> str:
        return f"{self.prefix}/+/results/+"

    def parse(self, topic: str) -> tuple[str, str, str | None]:
        """Split a device topic into ``(device, kind, pipeline)``.

        ``kind`` is one of cmd, reply, state, telemetry, results; ``pipeline`` is set
        for results only. Raises ``ProtocolError`` for any other topic.
        """
        parts = topic.split("/")
        head, rest = parts[: self._depth], parts[self._depth :]
        bad = ProtocolError(ReplyCode.SCHEMA, f"not a device topic under {self.prefix!r}: {topic}")
        if "/".join(head) != self.prefix or len(rest) < 2:
            raise bad
        device, kind = rest[0], rest[1]
        try:
            validate_device_id(device)
        except ValueError:
            raise bad from None
        if kind == "results" and len(rest) == 3:
            return device, kind, rest[2]
        if kind in ("cmd", "reply", "state", "telemetry") and len(rest) == 2:
            return device, kind, None
        raise bad


# -------------------------------------------------------------------------- messages


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ReplyCode(str, Enum):
    """Machine-readable outcome of a command; ``message`` carries the human text."""

    OK = "ok"
    ACCEPTED = "accepted"
    IN_PROGRESS = "in_progress"
    BAD_JSON = "bad_json"
    UNKNOWN_OP = "unknown_op"
    SCHEMA = "schema"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"
    DUPLICATE = "duplicate"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    BAD_MANIFEST = "bad_manifest"
    BAD_SIGNATURE = "bad_signature"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    DOWNLOAD_FAILED = "download_failed"
    STORAGE_FAILED = "storage_failed"
    VALIDATION_FAILED = "validation_failed"
    INCOMPATIBLE = "incompatible"
    PROBATION_FAILED = "probation_failed"
    SHADOW_REJECTED = "shadow_rejected"
    DOWNGRADE = "downgrade"
    CONFIG_REJECTED = "config_rejected"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal"


# Commands ---------------------------------------------------------------------------


class CommandAuth(Message):
    """An Ed25519 signature by a fleet command key (``mqtt.require_signed_commands``).

    The signature covers ``command_signing_bytes`` of the whole command, so the target,
    time and nonce cannot be changed without breaking it.
    """

    target: Annotated[str, Field(pattern=r"^(device|group)/[A-Za-z0-9][A-Za-z0-9._-]*$")] = Field(
        description="device/<device id> or group/<group id>"
    )
    ts: float = Field(description="Unix time of signing; devices refuse stale ones")
    nonce: Annotated[str, Field(min_length=8, max_length=128)] = Field(
        description="Random, never reused; devices refuse a nonce they have seen"
    )
    signature: Annotated[str, Field(max_length=256)] = Field(description="base64 Ed25519 signature")


class _CommandBase(Message):
    id: CommandId
    issued_at: float | None = Field(default=None, description="Unix time the console sent it")
    expires_at: float | None = Field(
        default=None, description="Unix time after which the device refuses the command"
    )
    auth: CommandAuth | None = Field(
        default=None, description="Signature; required when the device demands signed commands"
    )


class UrlArtifact(Message):
    """The model file at a URL the device fetches: ``https``, ``http`` or ``file``.

    Which schemes (and hosts) a device accepts is its own config (``transfer``).
    ``kind: "http"`` is the older spelling, still accepted and read as ``"url"``.
    """

    kind: Annotated[Literal["url", "http"], AfterValidator(lambda _kind: "url")] = "url"
    url: Annotated[str, Field(pattern=r"^(https?|file)://", max_length=2048)]


# A smaller chunk makes a transfer of many tiny messages; devices refuse it, except
# for a file that fits in one chunk.
MIN_CHUNK_BYTES = 1024


class MqttArtifact(Message):
    """The model file sent as ``Chunk`` messages on ``<prefix>/transfer/<transfer_id>``.

    ``chunks`` must be ``ceil(manifest.model.size / chunk_size)`` and ``chunk_size`` at
    least ``MIN_CHUNK_BYTES`` (unless the file fits in one chunk); devices check both.
    """

    kind: Literal["mqtt"] = "mqtt"
    transfer_id: CommandId
    chunk_size: Annotated[int, Field(gt=0, le=MAX_COMMAND_BYTES)]
    chunks: Annotated[int, Field(gt=0)]


Artifact: TypeAlias = Annotated[UrlArtifact | MqttArtifact, Field(discriminator="kind")]


class DeployCommand(_CommandBase):
    op: Literal["deploy"] = "deploy"
    manifest: dict[str, Any] = Field(description="The bundle's manifest.json, as an object")
    signature: str | None = Field(
        default=None, description="manifest.sig, base64; required when the device demands it"
    )
    artifact: Artifact
    pipeline: Name | None = Field(
        default=None, description="Pipeline to serve it on; default: the pipelines using the model"
    )
    shadow: bool | None = Field(
        default=None,
        description="false: no shadow evaluation before the swap; default: the device's config "
        "(models.probation.shadow)",
    )
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None,
        description="Least shadow agreement with the serving version, 0..1; default: the "
        "device's config (models.probation.min_agreement)",
    )


class RollbackCommand(_CommandBase):
    op: Literal["rollback"] = "rollback"
    model: Name
    to_version: Name | None = Field(default=None, description="Default: the previous version")


class StatusCommand(_CommandBase):
    op: Literal["status"] = "status"


class PingCommand(_CommandBase):
    op: Literal["ping"] = "ping"


class ConfigCommand(_CommandBase):
    op: Literal["config"] = "config"
    changes: dict[str, Any] = Field(
        min_length=1,
        description="Dotted config paths to new values, e.g. {'telemetry.interval_s': 5}",
    )


class RestartCommand(_CommandBase):
    op: Literal["restart"] = "restart"
    pipeline: Name | None = Field(default=None, description="Default: every pipeline")


Command: TypeAlias = Annotated[
    DeployCommand | RollbackCommand | StatusCommand | PingCommand | ConfigCommand | RestartCommand,
    Field(discriminator="op"),
]
COMMAND_OPS = ("deploy", "rollback", "status", "ping", "config", "restart")
_command_adapter: TypeAdapter[Command] = TypeAdapter(Command)


# Replies, state, telemetry, results -------------------------------------------------


class Reply(Message):
    id: str = Field(description="The command's id (a payload with no readable id gets no reply)")
    device: DeviceId
    status: Literal["accepted", "progress", "done", "failed"]
    code: ReplyCode
    message: str = ""
    ts: float
    # A plain string, not ``Stage``: a console reading a newer device shows a stage name
    # it does not know instead of refusing the reply.
    stage: str | None = Field(
        default=None, description=f"During progress: one of {', '.join(STAGES)}"
    )
    percent: Annotated[float, Field(ge=0, le=100)] | None = None
    data: dict[str, Any] | None = Field(
        default=None,
        description="Result of status, ping, ...; during progress, the stage's figures (shadow)",
    )


class RuntimeInfo(Message):
    name: str = Field(description="ai_edge_litert, tflite_runtime or tensorflow")
    version: str


class ModelState(Message):
    name: Name
    active: str | None = None
    last_known_good: str | None = None
    status: Literal["serving", "stored", "probation", "degraded", "absent"] = Field(
        default="absent",
        description="stored: a version is active but no pipeline uses the model (see message)",
    )
    versions: list[str] = Field(default_factory=list, description="Versions kept on the device")
    message: str | None = None


class PipelineState(Message):
    name: Name
    model: str | None = None
    status: Literal["running", "degraded", "stopped"] = "stopped"
    message: str | None = None
    drift: str | None = Field(
        default=None,
        max_length=500,
        description="set while the served model's outputs have drifted from its reference "
        "statistics (PSI over pipelines[].drift.threshold): what, how far, since when",
    )


class State(Message):
    protocol: int = PROTOCOL_VERSION
    device: DeviceId
    online: bool
    agent_version: str
    runtime: RuntimeInfo | None = None
    models: list[ModelState] = Field(default_factory=list)
    pipelines: list[PipelineState] = Field(default_factory=list)
    groups: list[GroupId] = Field(default_factory=list)
    restart_needed: list[str] = Field(
        default_factory=list,
        description="Config keys changed in the file (SIGHUP) that take effect at the next restart",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the agent could not do as configured but carried on without "
        "(a saved config override that no longer applies and was dropped)",
    )
    thread_deaths: int = Field(
        default=0, description="Agent threads that died unexpectedly since the agent started"
    )
    threads_down: list[str] = Field(
        default_factory=list,
        description="Agent threads dead or stuck now (the watchdog is not pinged meanwhile)",
    )
    since: float = Field(description="Unix time the agent started")
    ts: float


class StageLatency(Message):
    """Milliseconds over the last few hundred frames."""

    p50: float
    p95: float | None = None
    p99: float | None = None


class PipelineTelemetry(Message):
    model: str | None = None
    version: str | None = None
    fps: float = 0.0
    invoke_ms_p50: float | None = None
    invoke_ms_p95: float | None = None
    frames_in: int = 0
    results_out: int = 0
    dropped: int = 0
    errors: int = Field(default=0, description="invoke or processing errors of this version")
    source_state: str = "unknown"
    source_failures: int = 0
    stages: dict[str, StageLatency] = Field(
        default_factory=dict,
        description=(
            "ms per stage: wait (capture to the start of inference, less preprocess), "
            "preprocess, invoke, postprocess, handover (inference done to the outbox, "
            "less postprocess)"
        ),
    )
    drift: float | None = Field(
        default=None,
        description="PSI of the window's outputs against the served model's reference "
        "statistics; null without a reference or below pipelines[].drift.min_frames",
    )
    confidence: list[float] | None = Field(
        default=None,
        max_length=32,
        description="the window's top-1 confidence (classify) or detection scores (detect) "
        "at the quantiles 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95",
    )
    captured: int = Field(
        default=0, description="frames kept now for labelling (pipelines[].capture)"
    )
    capture_errors: int = Field(
        default=0, description="frames that could not be written (full disk, I/O errors)"
    )


class Telemetry(Message):
    device: DeviceId
    seq: Annotated[int, Field(ge=0)]
    ts: float
    uptime_s: float
    cpu_percent: float | None = None
    mem_rss_mb: float | None = None
    load_1m: float | None = None
    temperature_c: float | None = None
    disk_free_mb: float | None = None
    outbox_depth: int = Field(default=0, description="queued: on disk and in memory")
    outbox_dropped: int = Field(default=0, description="accepted, then dropped (any reason)")
    outbox_accepted: int = Field(default=0, description="= delivered + dropped + depth")
    outbox_delivered: int = Field(default=0, description="acknowledged by the broker")
    outbox_refused: int = Field(default=0, description="not accepted: too much in memory")
    thread_deaths: int = Field(default=0, description="as in State")
    threads_down: list[str] = Field(default_factory=list, description="as in State")
    pipelines: dict[str, PipelineTelemetry] = Field(default_factory=dict)


class ClassScore(Message):
    index: int
    label: str | None = None
    score: float


class Keypoint(Message):
    name: str | None = None
    x: float = Field(description="in source pixels")
    y: float = Field(description="in source pixels")
    score: float | None = None


class Detection(Message):
    index: int
    label: str | None = None
    score: float
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in source pixels")
    keypoints: list[Keypoint] | None = Field(
        default=None, description="anchors decoders with keypoints (face landmarks)"
    )


class SegmentClass(Message):
    index: int
    label: str | None = None
    area: float = Field(description="fraction of the frame, 0..1")


class Region(Message):
    """One connected region of a class in a segmentation map."""

    index: int
    label: str | None = None
    area: float = Field(description="fraction of the frame, 0..1")
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in source pixels")


class RleMask(Message):
    """A segmentation map reduced to ``width`` x ``height``, row by row, as runs of
    ``[class index, length]``; the lengths add up to width * height."""

    width: Annotated[int, Field(gt=0)]
    height: Annotated[int, Field(gt=0)]
    runs: list[tuple[int, int]]


class Segmentation(Message):
    classes: list[SegmentClass] = Field(description="present classes, largest first")
    regions: list[Region] = Field(description="largest connected regions first")
    mask: RleMask | None = None


class RawTensor(Message):
    """One output of a ``raw`` model: every value when it has at most the pipeline's
    ``raw.max_values``, else a summary."""

    shape: list[int]
    values: list[float] | None = Field(default=None, description="flattened, row-major")
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    argmax: int | None = Field(default=None, description="flat index of the largest value")


class Result(Message):
    device: DeviceId
    pipeline: Name
    seq: Annotated[int, Field(ge=0)]
    ts: float
    frame: int = Field(description="Frame number from the source")
    model: str
    version: str
    latency_ms: float = Field(description="Pre-process + invoke + post-process")
    classes: list[ClassScore] | None = Field(
        default=None, description="classify; keyword: the keyword that fired"
    )
    detections: list[Detection] | None = None
    keypoints: list[Keypoint] | None = Field(default=None, description="keypoints: one pose")
    segmentation: Segmentation | None = None
    raw: list[RawTensor] | None = None


class Chunk(Message):
    transfer_id: CommandId
    index: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(gt=0)]
    data: str = Field(description="base64 bytes of this chunk")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None,
        description="sha256 of this chunk's bytes; a device drops a chunk that fails it",
    )


MAX_MISSING_LISTED = 1024


class ChunkRequest(Message):
    """A device's request for chunks again, on ``<prefix>/transfer/<transfer_id>/missing``."""

    transfer_id: CommandId
    device: DeviceId
    missing: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_MISSING_LISTED)] = (
        Field(description="Chunk indexes still missing (at most 1024 per request)")
    )
    ts: float


# ------------------------------------------------------------------ encode / decode


def format_validation_error(err: ValidationError, data: object = None) -> str:
    """One ``path: problem`` clause per error, joined with ``; ``."""
    return "; ".join(f"{loc}: {msg}" for loc, msg in validation_problems(err, data))


def validation_problems(err: ValidationError, data: object = None) -> list[tuple[str, str]]:
    """(key path, message) for each error, with union tags dropped from the path.

    Pydantic puts the discriminator's value into ``loc`` (``source.camera.fps``);
    users wrote ``source.fps``, so a step that is not a key of the input is dropped.
    """
    problems = []
    for e in err.errors():
        path: list[str] = []
        node: object = data
        for step in e["loc"]:
            if isinstance(node, Mapping) and isinstance(step, str) and step not in node:
                if node.get("type") == step or node.get("op") == step or node.get("kind") == step:
                    continue
            path.append(str(step))
            if isinstance(node, Mapping):
                node = node.get(step)
            elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
                node = node[step]
            else:
                node = None
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key missing"
        problems.append((".".join(path) or "(root)", msg))
    return problems


# Structural bytes of JSON: brackets open and close levels; quotes and backslashes
# decide what is inside a string.
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def json_depth_exceeds(payload: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when brackets outside strings nest deeper than ``max_depth``.

    A scan of the raw bytes, before any parser runs: it allocates nothing that
    grows with the payload and stops at the first level too deep. It does not
    validate JSON (the parser does that next); it only bounds how deep the parser
    can recurse.
    """
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _STRUCTURE.finditer(payload):
        at = match.start()
        if at == escaped_at:
            continue
        char = payload[at]
        if in_string:
            if char == 0x5C:  # backslash: the next byte is escaped
                escaped_at = at + 1
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return True
        elif char in (0x5D, 0x7D):
            depth -= 1
    return False


def _check_size_and_depth(payload: bytes, what: str, max_bytes: int) -> None:
    if len(payload) > max_bytes:
        raise ProtocolError(
            ReplyCode.TOO_LARGE,
            f"{what} of {len(payload)} bytes exceeds the {max_bytes}-byte limit",
        )
    if json_depth_exceeds(payload):
        raise ProtocolError(ReplyCode.SCHEMA, f"{what} is nested deeper than {MAX_JSON_DEPTH}")


def decode_command(payload: bytes) -> Command:
    """Parse a command payload, or raise ``ProtocolError`` with the reason's code.

    Cheapest checks first: size, then nesting depth on the raw bytes, then JSON,
    then the schema; nothing that grows with the payload is built before the
    first two passed.
    """
    _check_size_and_depth(payload, "command", MAX_COMMAND_BYTES)
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(ReplyCode.BAD_JSON, f"command is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ReplyCode.SCHEMA, "command must be a JSON object")
    op = data.get("op")
    if op not in COMMAND_OPS:
        raise ProtocolError(
            ReplyCode.UNKNOWN_OP,
            f"unknown op {op!r}; expected one of {', '.join(COMMAND_OPS)}",
        )
    try:
        return _command_adapter.validate_python(data)
    except ValidationError as err:
        raise ProtocolError(ReplyCode.SCHEMA, format_validation_error(err, data)) from None


M = TypeVar("M", bound=Message)


def decode_message(
    payload: bytes, model: type[M], max_bytes: int, *, from_device: bool = False
) -> M:
    """Parse any other message (``Chunk``, ``ChunkRequest``, ...) through the same
    guards as a command: size, depth, then JSON and schema in one pass.
    ``from_device``: a console reading what a device sent leaves out keys it does not
    know (``read_message``).

    Raises ``ProtocolError`` (``too_large``, ``bad_json`` or ``schema``).
    """
    name = model.__name__
    _check_size_and_depth(payload, name, max_bytes)
    try:
        return read_message(payload, model) if from_device else model.model_validate_json(payload)
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise ProtocolError(ReplyCode.BAD_JSON, f"{name} is not valid JSON") from None
        raise ProtocolError(ReplyCode.SCHEMA, format_validation_error(err)) from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ReplyCode.BAD_JSON, f"{name} is not valid JSON: {exc}") from None


def read_message(payload: bytes | str, model: type[M]) -> M:
    """Parse a message a device sent (``State``, ``Telemetry``, ``Reply``, ``Result``,
    ``ChunkRequest``) as a console must: keys this version does not know are left out,
    at any depth, so a console reads the messages of a newer device (docs/protocol.md,
    *Versioning*). Anything else wrong raises ``ValidationError``. Commands and chunks
    are never read this way: a device refuses what it does not know.
    """
    try:
        return model.model_validate_json(payload)
    except ValidationError as err:
        unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        first = err
    # Only on the slow path: a message from a device of the same version costs one parse.
    data = json.loads(payload)
    for loc in unknown:
        _drop_key(data, loc)
    try:
        return model.model_validate(data)
    except ValidationError:
        # Still wrong: the first error names the unknown keys too (a typo, more likely
        # than a newer device, when a known key is missing).
        raise first from None


def _drop_key(data: Any, loc: tuple[str | int, ...]) -> None:
    node = data
    for step in loc[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def max_chunk_message_bytes(chunk_size: int = MAX_COMMAND_BYTES) -> int:
    """The largest ``Chunk`` message for a chunk of ``chunk_size`` bytes: its base64
    text plus the JSON around it (ids, index, total, sha256)."""
    return 4 * ((chunk_size + 2) // 3) + 1024


def command_id_of(payload: bytes) -> str:
    """Best-effort id of a payload that failed to parse, so its failure can be answered.

    Never raises: a payload too large, too deep or unreadable simply has no id.
    """
    try:
        if len(payload) > MAX_COMMAND_BYTES or json_depth_exceeds(payload):
            return ""
        data = json.loads(payload)
        value = data.get("id") if isinstance(data, dict) else None
        if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and SAFE_ID_RE.match(value):
            return value
        return ""
    except Exception:
        return ""


def command_signing_bytes(data: Mapping[str, Any]) -> bytes:
    """The bytes a command signature covers: the command object as sent, without
    ``auth.signature``, as canonical JSON (keys sorted, no spaces, UTF-8)."""
    body = dict(data)
    auth = body.get("auth")
    if isinstance(auth, Mapping):
        body["auth"] = {k: v for k, v in auth.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(message: Message) -> bytes:
    return message.to_bytes()


_MESSAGES: dict[str, type[Message]] = {
    "Reply": Reply,
    "State": State,
    "Telemetry": Telemetry,
    "Result": Result,
    "Chunk": Chunk,
    "ChunkRequest": ChunkRequest,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message, keyed by message name."""
    schemas: dict[str, dict[str, Any]] = {"Command": _command_adapter.json_schema()}
    for name, model in _MESSAGES.items():
        schemas[name] = model.model_json_schema()
    return schemas
