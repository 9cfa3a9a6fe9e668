"""The files a config names: relative paths made absolute, and checks that they exist.

Relative paths inside a config are taken relative to the config file's folder, so
the same file works from any working directory (systemd starts the agent in /).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from agent.config import AgentConfig, pipeline_key


def path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str]]:
    """Every (key path, owning model, field name) whose value is a Path or list of Paths.

    A list item is named as ``pipeline_key`` names pipelines: by its name if it has one.
    """
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from path_fields(value, f"{path}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            names = [getattr(item, "name", None) for item in value]
            for i, item in enumerate(value):
                yield from path_fields(item, f"{path}.{pipeline_key(names, i)}.")
        elif isinstance(value, Path) or (
            isinstance(value, list) and value and isinstance(value[0], Path)
        ):
            yield path, model, name


def resolve_paths(config: AgentConfig, base: Path) -> AgentConfig:
    """``config`` with every relative path taken relative to ``base`` (in place)."""
    for _path, owner, name in path_fields(config):
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
    for path, owner, name in path_fields(config):
        # Without the pipeline's name: pipelines.door.source.path -> pipelines.source.path
        parts = path.split(".")
        generic = ".".join(parts[:1] + parts[2:] if parts[0] == "pipelines" else parts)
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
