"""The fleet server's configuration: a YAML file, every key optional.

``edge-fleet server`` starts with no file at all (SQLite and artifacts under
``./fleet-data``, broker on 127.0.0.1:1883, API on 127.0.0.1:8400). Unknown keys are
refused with their path, as in the agent's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.protocol import DEFAULT_PREFIX, format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    prefix: str = DEFAULT_PREFIX
    tls: bool = False
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    # MQTT 5 shared-subscription group of the server processes: telemetry and replies
    # go to one process of the group each.
    share_group: str = "edge-fleet"


class HttpConfig(_Strict):
    bind: str = "127.0.0.1:8400"
    # The URL devices use to reach this server's artifacts (http://host:port); by
    # default the bind address, with a wildcard replaced by the broker-facing address.
    public_url: str | None = None
    max_upload_mb: Annotated[float, Field(gt=0, le=4096)] = 512


class ArtifactsConfig(_Strict):
    # Where bundles are kept; default <data_dir>/artifacts.
    dir: Path | None = None
    # How devices get model files: from this server over HTTP (Range supported), as
    # chunks over MQTT (broker-only sites), or from an object store that mirrors the
    # artifact directory (base_url + "<sha256>/model.tflite").
    delivery: Literal["http", "mqtt", "url"] = "http"
    base_url: str | None = None
    chunk_size: Annotated[int, Field(ge=1024, le=256 * 1024)] = 64 * 1024


class ReconcileConfig(_Strict):
    interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # A device's tries of one desired version before it is left alone (given_up).
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    backoff_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    backoff_max_s: Annotated[float, Field(ge=0, le=86400)] = 600.0
    # A sent command with no final reply by then counts as a failed try.
    command_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 1800.0
    command_expires_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0
    lease_s: Annotated[float, Field(gt=0, le=600)] = 10.0


class RetentionConfig(_Strict):
    telemetry_days: Annotated[float, Field(gt=0)] = 30
    commands_days: Annotated[float, Field(gt=0)] = 90
    events_days: Annotated[float, Field(gt=0)] = 90


class AuthConfig(_Strict):
    # Accept requests without a token as read-only (a lab on a closed network).
    anonymous_read: bool = False


class ServerConfig(_Strict):
    data_dir: Path = Path("fleet-data")
    # SQLAlchemy URL; default sqlite:///<data_dir>/fleet.db.
    db: str | None = None
    broker: BrokerConfig = BrokerConfig()
    http: HttpConfig = HttpConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    # Public keys (PEM) a bundle's signature must verify with on upload.
    trusted_keys: list[Path] = Field(default_factory=list)
    require_signature: bool = True
    # Ed25519 private key signing every command (devices with require_signed_commands).
    command_key: Path | None = None
    reconcile: ReconcileConfig = ReconcileConfig()
    retention: RetentionConfig = RetentionConfig()
    auth: AuthConfig = AuthConfig()
    # A name for this process in logs and the reconciler lease; default host:pid.
    instance: str | None = None
    log_format: Literal["text", "json"] = "text"


class ConfigError(Exception):
    """The config file is unreadable or invalid; one line per problem."""


def load_config(path: Path | None) -> ServerConfig:
    if path is None:
        return ServerConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, data)}") from None
