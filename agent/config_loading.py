"""Reading the YAML config file into an ``AgentConfig``.

Every problem becomes a ``ConfigError`` whose lines name the file (and the line, for
YAML syntax) or the key path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, ConfigError, parse_config
from agent.config_paths import resolve_paths


def read_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config file's YAML data, not validated; raises ``ConfigError``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text: {exc.reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{p}:{where}: invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping of keys"])
    return data


def config_from_data(data: dict[str, Any], path: str | os.PathLike[str]) -> AgentConfig:
    """Validate raw data read from ``path``, resolving relative paths against its folder."""
    return resolve_paths(parse_config(data, str(path)), Path(path).parent.resolve())


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a YAML config file (no saved overrides); raises ``ConfigError``."""
    return config_from_data(read_raw(path), path)
