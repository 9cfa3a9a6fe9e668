"""The fleet server's tables (SQLAlchemy 2 declarative); Alembic migrations follow them.

Times are Unix seconds as floats, as on the wire. Every query the API and the
dashboard make is served by an index declared here. The server keeps no state
outside these tables and the broker: any process against the same database can
take over.

Owners: ingest writes devices, device_groups, device_models, device_pipelines,
version_history,
telemetry_minutes, replies and events, and a command's reply fields; the
reconciler (one active at a time, holding the ``reconciler`` lease) writes rollout
progress and sends commands; the API writes bundles, desired state, rollouts it
creates, tokens and the audit log.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = 64  # agent.protocol.MAX_ID_LENGTH
NAME = 128  # model names and versions (agent.protocol.validate_name)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, list[str]: JSON}


# ------------------------------------------------------------------- inventory


class Device(Base):
    """One device, as its retained state and telemetry last described it."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # ok | degraded | offline: derived from the state at ingest, for counts and filters.
    status: Mapped[str] = mapped_column(String(16), default="offline", index=True)
    protocol: Mapped[int | None] = mapped_column(Integer)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    runtime: Mapped[str | None] = mapped_column(String(128))  # "ai_edge_litert 2.3.0"
    groups: Mapped[list[str]] = mapped_column(default=list)
    state: Mapped[dict[str, Any] | None] = mapped_column()  # the last State, as sent
    state_ts: Mapped[float | None] = mapped_column(Float)
    # When the server received that state (its own clock, unlike state_ts): what the
    # reconciler compares with its own times.
    state_received_at: Mapped[float | None] = mapped_column(Float)
    telemetry: Mapped[dict[str, Any] | None] = mapped_column()  # the last Telemetry
    telemetry_ts: Mapped[float | None] = mapped_column(Float)
    # Denormalised from the last telemetry (sum over pipelines / worst one) for sorting.
    fps: Mapped[float | None] = mapped_column(Float)
    invoke_p95_ms: Mapped[float | None] = mapped_column(Float)


class DeviceGroup(Base):
    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(
        String(ID), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    group: Mapped[str] = mapped_column(String(ID), primary_key=True, index=True)


class DeviceModel(Base):
    """One model on one device, from its retained state."""

    __tablename__ = "device_models"
    __table_args__ = (Index("ix_device_models_model_active", "model", "active"),)

    device_id: Mapped[str] = mapped_column(
        String(ID), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    active: Mapped[str | None] = mapped_column(String(NAME))
    last_known_good: Mapped[str | None] = mapped_column(String(NAME))
    # serving | stored | probation | degraded | absent (agent.protocol.ModelState)
    status: Mapped[str] = mapped_column(String(16))
    versions: Mapped[list[str]] = mapped_column(default=list)
    message: Mapped[str | None] = mapped_column(Text)


class DevicePipeline(Base):
    """One pipeline on one device, from its retained state: kept apart from
    ``devices.state`` so that the overview finds drifting pipelines with a query."""

    __tablename__ = "device_pipelines"

    device_id: Mapped[str] = mapped_column(
        String(ID), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    pipeline: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(NAME))
    # running | degraded | stopped (agent.protocol.PipelineState)
    status: Mapped[str] = mapped_column(String(16))
    # The state's drift warning (device-sent text, at most 500 characters), null when
    # the outputs are within the threshold.
    drift: Mapped[str | None] = mapped_column(Text, index=True)


class VersionHistory(Base):
    """Which version of a model a device served, from when until when."""

    __tablename__ = "version_history"
    __table_args__ = (Index("ix_version_history_device", "device_id", "started"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(ID))
    model: Mapped[str] = mapped_column(String(NAME))
    version: Mapped[str | None] = mapped_column(String(NAME))
    started: Mapped[float] = mapped_column(Float)
    ended: Mapped[float | None] = mapped_column(Float)


class TelemetryMinute(Base):
    """Telemetry downsampled per device, pipeline and minute.

    ``pipeline`` is ``""`` for the device-wide row, whose ``samples`` counts every
    telemetry message ingested. Sums (with their counts) rather than means, so that
    several ingest processes can add into one row with an upsert.
    """

    __tablename__ = "telemetry_minutes"
    __table_args__ = (Index("ix_telemetry_minutes_minute", "minute"),)

    device_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    minute: Mapped[int] = mapped_column(Integer, primary_key=True)  # int(ts // 60)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    fps_sum: Mapped[float] = mapped_column(Float, default=0.0)
    invoke_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    invoke_p95_max: Mapped[float | None] = mapped_column(Float)
    wait_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    preprocess_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    postprocess_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_samples: Mapped[int] = mapped_column(Integer, default=0)
    # Counters are cumulative on the device: the largest value seen in the minute.
    errors: Mapped[int] = mapped_column(Integer, default=0)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    source_failures: Mapped[int] = mapped_column(Integer, default=0)
    source_state: Mapped[str | None] = mapped_column(String(32))
    # The largest drift (PSI) reported in the minute; null when none was (no reference).
    # The largest, not the mean: a minute that crossed the threshold shows it, and a
    # maximum folds into the upsert without a count beside it.
    drift_max: Mapped[float | None] = mapped_column(Float)
    # Device-wide row only.
    cpu_sum: Mapped[float] = mapped_column(Float, default=0.0)
    mem_rss_mb_max: Mapped[float | None] = mapped_column(Float)
    temperature_c_max: Mapped[float | None] = mapped_column(Float)
    outbox_dropped: Mapped[int] = mapped_column(Integer, default=0)
    outbox_depth_max: Mapped[int] = mapped_column(Integer, default=0)


class Event(Base):
    """Something that happened to a device (online, offline, version changed,
    probation failed, thread died), for the device page and the events feed."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_device_ts", "device_id", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    device_id: Mapped[str | None] = mapped_column(String(ID))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column()


# ------------------------------------------------------------------- artifacts


class BundleRecord(Base):
    """An uploaded bundle; its files live in the artifact store under its sha256."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME), index=True)
    version: Mapped[str] = mapped_column(String(NAME))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column()
    signature: Mapped[str | None] = mapped_column(Text)
    signer: Mapped[str | None] = mapped_column(String(64))  # key id of the verifying key
    created_at: Mapped[str] = mapped_column(String(64))  # the manifest's created_at
    uploaded_at: Mapped[float] = mapped_column(Float)
    uploaded_by: Mapped[str] = mapped_column(String(ID))


# ------------------------------------------------------- desired state, rollouts


class Desired(Base):
    """What a target (a group, or one device: a pin) should run of one model.

    ``rollout_id`` is the rollout that set it: while that rollout has not finished,
    only the devices of its opened waves are brought to the version.
    """

    __tablename__ = "desired"
    __table_args__ = (
        UniqueConstraint("target_kind", "target", "model", name="uq_desired_target_model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(8))  # group | device
    target: Mapped[str] = mapped_column(String(ID))
    model: Mapped[str] = mapped_column(String(NAME), index=True)
    version: Mapped[str] = mapped_column(String(NAME))
    pipeline: Mapped[str | None] = mapped_column(String(NAME))
    rollout_id: Mapped[str | None] = mapped_column(String(ID))
    # The deploy's model-health checks (DeployCommand.shadow, .min_agreement); null:
    # each device's own config (models.probation).
    shadow: Mapped[bool | None] = mapped_column(Boolean)
    min_agreement: Mapped[float | None] = mapped_column(Float)
    set_at: Mapped[float] = mapped_column(Float)
    set_by: Mapped[str] = mapped_column(String(ID))


class Rollout(Base):
    """A change of desired state, carried out wave by wave.

    ``state``: running | waiting_approval | paused | halted | done | aborted | superseded.
    ``plan``: {"canary": "1" | "10%" | null, "waves": int, "max_failures": int,
    "approval": bool, "wave_count": int (waves as planned, at least one),
    "accepted_failures": int (set when a halted rollout is resumed)}. ``previous``: the
    desired row it replaced ({"version", "pipeline", "rollout_id", "shadow",
    "min_agreement"}) or null; abort restores it. ``shadow`` and ``min_agreement`` go
    into every deploy it sends when set (null: the device's config decides).
    """

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_state_created", "state", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME), index=True)
    version: Mapped[str] = mapped_column(String(NAME))
    pipeline: Mapped[str | None] = mapped_column(String(NAME))
    shadow: Mapped[bool | None] = mapped_column(Boolean)
    min_agreement: Mapped[float | None] = mapped_column(Float)
    target_kind: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(ID))
    state: Mapped[str] = mapped_column(String(24))
    plan: Mapped[dict[str, Any]] = mapped_column()
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    previous: Mapped[dict[str, Any] | None] = mapped_column()
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(ID))
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class RolloutDevice(Base):
    """One device's progress in a rollout, and its retries.

    ``status``: waiting (its wave is not open) | pending (to be sent when online and
    due) | sent | a reply stage (accepted, downloading, validating, probation, ...) |
    done | failed (a try failed; retried at ``next_attempt_at``) | given_up (after
    ``max_attempts``: left alone until the operator retries) | skipped.
    """

    __tablename__ = "rollout_devices"
    __table_args__ = (
        Index("ix_rollout_devices_status", "rollout_id", "status"),
        Index("ix_rollout_devices_device", "device_id"),
    )

    rollout_id: Mapped[str] = mapped_column(
        String(ID), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(24), default="waiting")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    command_id: Mapped[str | None] = mapped_column(String(ID))
    code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


# ---------------------------------------------------------- commands, replies


class CommandRecord(Base):
    """Every command the server sent to a device, and how it ended.

    A row is written before the command is published, so a server that dies between
    the two leaves a row that the next reconciler sends again under the same id (the
    device never runs an id twice).
    """

    __tablename__ = "commands"
    __table_args__ = (
        Index("ix_commands_device_created", "device_id", "created_at"),
        # Retention deletes finished commands by age.
        Index("ix_commands_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID))
    op: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column()  # the command as sent, unsigned
    rollout_id: Mapped[str | None] = mapped_column(String(ID), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(ID))  # a token name, or "reconciler"
    expires_at: Mapped[float | None] = mapped_column(Float)
    published_at: Mapped[float | None] = mapped_column(Float)
    # sent | accepted | progress | done | failed | expired
    status: Mapped[str] = mapped_column(String(16), default="sent", index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    percent: Mapped[float | None] = mapped_column(Float)
    code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column()
    finished_at: Mapped[float | None] = mapped_column(Float)


class ReplyRecord(Base):
    __tablename__ = "replies"
    __table_args__ = (
        Index("ix_replies_command", "command_id"),
        Index("ix_replies_device_received", "device_id", "received_at"),
        # Retention deletes replies by age.
        Index("ix_replies_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command_id: Mapped[str] = mapped_column(String(ID))
    device_id: Mapped[str] = mapped_column(String(ID))
    status: Mapped[str] = mapped_column(String(16))
    code: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(32))
    percent: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column()
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


# ------------------------------------------------------------ auth, audit, lease


class ApiToken(Base):
    """A bearer token; only its sha256 is kept (tokens are 32 random bytes)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(ID), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # read | operator
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEntry(Base):
    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_actor_ts", "actor", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(ID))
    action: Mapped[str] = mapped_column(String(48))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict[str, Any] | None] = mapped_column()


class Lease(Base):
    """A named lease (``reconciler``): held by one server process until it expires."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)
    # Increases with every change of holder: a fencing token for the holder's writes.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
