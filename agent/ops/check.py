"""Online diagnostics for ``edge-agent check`` (without ``--offline``)."""

from __future__ import annotations

import socket

from agent.config import AgentConfig


def check_online(config: AgentConfig, timeout_s: float = 5.0) -> list[str]:
    """Problems reaching what the config points at; empty when all is reachable."""
    problems = []
    host, port = config.mqtt.host, config.mqtt.port
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        problems.append(f"mqtt.host: cannot reach broker at {host}:{port}: {exc.strerror or exc}")
    return problems
