"""The console side of signed commands: every command leaves signed for its one device.

A device with ``mqtt.require_signed_commands: true`` obeys only commands whose ``auth``
(target, signing time, nonce) is signed by one of its ``mqtt.command_keys``. The signer
signs at send time, not when the command is built: a command sent again (to a device
that came back online) gets a fresh nonce and time, so the device answers it as a
duplicate id instead of refusing it as a replay.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.link.signing import sign_command
from agent.models.manifest import load_private_key
from agent.protocol import Command


class CommandSigner:
    """Signs command payloads with a fleet command key (Ed25519)."""

    def __init__(self, key: Ed25519PrivateKey, *, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    @classmethod
    def from_file(cls, path: Path) -> CommandSigner:
        """A signer for a PEM private key (``edge-convert keygen`` makes one);
        raises ``agent.models.manifest.SignatureError`` with a one-line reason."""
        return cls(load_private_key(path))

    def payload(self, target: str, command: Command) -> bytes:
        """The command as sent on the wire, signed for ``target`` (``device/<id>`` or
        ``group/<id>``) with a new nonce and the current time."""
        data = json.loads(command.to_bytes())
        data["auth"] = {"target": target, "ts": self._clock(), "nonce": secrets.token_hex(16)}
        signed = sign_command(data, self._key)
        # The device verifies the canonical form of what it parses, so any JSON spelling
        # of the same object verifies; ensure_ascii=False keeps it byte-for-byte short.
        return json.dumps(signed, separators=(",", ":"), ensure_ascii=False).encode()
