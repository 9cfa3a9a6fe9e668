"""Bearer tokens with a role (``read`` or ``operator``), kept as sha256 only.

A token is 32 random bytes (urlsafe base64, prefixed ``eft_``): hashing it with one
round of sha256 is enough, as for any high-entropy API key (nothing to guess from
the hash), and keeps every request to one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db.schema import ApiToken, AuditEntry

Role = Literal["read", "operator"]
ROLES: tuple[Role, ...] = ("read", "operator")
TOKEN_PREFIX = "eft_"


class AuthError(Exception):
    """A token operation that cannot be done; one line."""


@dataclass(frozen=True)
class Actor:
    """Who makes a request: the token's name and role."""

    name: str
    role: Role

    @property
    def can_write(self) -> bool:
        return self.role == "operator"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, name: str, role: Role, now: float | None = None) -> str:
    """A new token for ``name``; returns the only copy of its plain text."""
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    existing = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if existing is not None and not existing.revoked:
        raise AuthError(f"a token named {name!r} exists already (revoke it first)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    created = time.time() if now is None else now
    if existing is not None:
        # A revoked name may be given a new token; the audit log keeps the name's past.
        existing.role, existing.token_sha256 = role, token_hash(token)
        existing.created_at, existing.revoked = created, False
        return token
    session.add(
        ApiToken(
            name=name, role=role, token_sha256=token_hash(token), created_at=created, revoked=False
        )
    )
    return token


def revoke_token(session: Session, name: str) -> None:
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise AuthError(f"no token named {name!r}")
    row.revoked = True


def actor_for(session: Session, token: str) -> Actor | None:
    """The actor a presented token stands for, or None (unknown or revoked)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == token_hash(token)))
    if row is None or row.revoked or row.role not in ROLES:
        return None
    return Actor(row.name, row.role)


def audit(
    session: Session,
    actor: Actor | str,
    action: str,
    target: str = "",
    detail: dict[str, object] | None = None,
    now: float | None = None,
) -> None:
    """Record a write in the audit log, in the caller's transaction."""
    session.add(
        AuditEntry(
            ts=time.time() if now is None else now,
            actor=actor.name if isinstance(actor, Actor) else actor,
            action=action,
            target=target,
            detail=detail,
        )
    )
