"""Signed commands: an Ed25519 signature by a fleet command key over the whole command.

A signed command names its target (``device/<id>`` or ``group/<id>``), the time it
was signed and a nonce. The device refuses a bad signature, a command for another
device or group, a signing time off by more than ``mqtt.command_max_age_s``, and a
nonce it has seen (a replay).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Incoming


class NonceStore(Protocol):
    def use_nonce(self, nonce: str, now: float, window_s: float) -> bool: ...


def sign_command(data: dict[str, object], key: Ed25519PrivateKey) -> dict[str, object]:
    """``data`` (with ``auth`` holding target, ts and nonce) with the signature filled in."""
    signature = key.sign(p.command_signing_bytes(data))
    auth = dict(data["auth"])  # type: ignore[call-overload]
    auth["signature"] = base64.b64encode(signature).decode()
    return {**data, "auth": auth}


class CommandVerifier:
    def __init__(self, config: AgentConfig) -> None:
        self._keys: list[Ed25519PublicKey] = []
        for path in config.mqtt.command_keys:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError(f"mqtt.command_keys: cannot load {path}: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"mqtt.command_keys: {path} is not an Ed25519 public key")
            self._keys.append(key)
        device = config.device
        self._identities = {f"device/{device.id}"} | {f"group/{g}" for g in device.groups}
        self._max_age_s = config.mqtt.command_max_age_s

    def problem(
        self, incoming: Incoming, command: p.Command, now: float, nonces: NonceStore
    ) -> str | None:
        """Why the command must be refused, or None when it is properly signed."""
        auth = command.auth
        if auth is None:
            return "unsigned command refused: this device requires signed commands"
        try:
            signature = base64.b64decode(auth.signature, validate=True)
            signed = p.command_signing_bytes(json.loads(incoming.payload))
        except (binascii.Error, ValueError):
            return "command signature is not valid base64"
        if not any(self._verifies(key, signature, signed) for key in self._keys):
            return "command signature does not verify with any trusted command key"
        if auth.target not in self._identities:
            return f"command is signed for {auth.target}, not for this device"
        if abs(now - auth.ts) > self._max_age_s:
            return (
                f"command was signed {now - auth.ts:.0f}s from now; allowed: {self._max_age_s:.0f}s"
            )
        if not nonces.use_nonce(auth.nonce, now, self._max_age_s):
            return "command nonce was used before: replay refused"
        return None

    @staticmethod
    def _verifies(key: Ed25519PublicKey, signature: bytes, signed: bytes) -> bool:
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            return False
        return True
