"""What the HTTP API's handlers are given: the server's parts, built by ``FleetServer``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .artifacts import ArtifactStore
from .commands import Sender
from .config import ServerConfig
from .db import Database


@dataclass
class ServerContext:
    config: ServerConfig
    database: Database
    store: ArtifactStore
    # The fleet's bundle signing keys (config.trusted_keys, loaded).
    trusted_keys: list[Ed25519PublicKey]
    # Publishes commands (the server's MQTT link); None when the API runs without one.
    sender: Sender | None
    clock: Callable[[], float] = time.time
    # Figures of the running parts for /metrics and /healthz: name -> value.
    figures: Callable[[], dict[str, Any]] = field(default=lambda: {})
