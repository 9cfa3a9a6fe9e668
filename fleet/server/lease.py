"""A named lease in the database: one holder at a time, taken over when it expires.

Taken and renewed by one conditional UPDATE (``holder`` is us, or the lease has
expired), or an INSERT when no row exists yet; the primary key makes two first
takers race safely. Both are plain SQL that SQLite and PostgreSQL run alike: on
PostgreSQL the second of two concurrent UPDATEs re-checks its WHERE after the first
commits, so it finds the lease taken. ``epoch`` grows with every change of holder;
``held()`` compares it, so a process that stalled past its expiry and lost the lease
stops acting even if it renews nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .db.schema import Lease as LeaseRow

log = logging.getLogger(__name__)


class Lease:
    """``name`` held by ``holder`` for ``ttl_s`` at a time; ``acquire`` takes or renews it."""

    def __init__(
        self,
        database: Database,
        name: str,
        holder: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.epoch: int | None = None  # the epoch we hold, when we think we hold it
        self.takeovers = 0  # times this process took the lease from another holder

    def acquire(self) -> bool:
        """Renew the lease, or take it when free or expired; True when held now."""
        now = self.clock()
        expires = now + self.ttl_s
        with self.database.session() as s:
            result = s.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    (LeaseRow.holder == self.holder) | (LeaseRow.expires_at <= now),
                )
                .values(
                    holder=self.holder,
                    expires_at=expires,
                    epoch=case(
                        (LeaseRow.holder == self.holder, LeaseRow.epoch),
                        else_=LeaseRow.epoch + 1,
                    ),
                )
                .execution_options(synchronize_session=False)
            )
            taken = result.rowcount == 1  # type: ignore[attr-defined]
            if taken:
                epoch = s.scalar(select(LeaseRow.epoch).where(LeaseRow.name == self.name))
        if not taken:
            taken, epoch = self._insert(expires)
        if not taken:
            if self.epoch is not None:
                log.warning("lease %r: lost to another holder", self.name)
            self.epoch = None
            return False
        if self.epoch != epoch:
            log.info("lease %r: held by %s (epoch %s)", self.name, self.holder, epoch)
            if self.epoch is None and epoch is not None and epoch > 1:
                self.takeovers += 1
        self.epoch = epoch
        return True

    def _insert(self, expires: float) -> tuple[bool, int | None]:
        try:
            with self.database.session() as s:
                s.add(LeaseRow(name=self.name, holder=self.holder, expires_at=expires, epoch=1))
        except IntegrityError:
            return False, None  # it exists: held by someone else
        return True, 1

    def held(self) -> bool:
        """Whether we hold the lease now (same holder and epoch, not expired)."""
        if self.epoch is None:
            return False
        with self.database.session() as s:
            row = s.get(LeaseRow, self.name)
            ok = (
                row is not None
                and row.holder == self.holder
                and row.epoch == self.epoch
                and row.expires_at > self.clock()
            )
        if not ok:
            self.epoch = None
        return ok

    def release(self) -> None:
        """Let the lease go now, so another process need not wait for it to expire."""
        if self.epoch is None:
            return
        with self.database.session() as s:
            s.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.holder,
                    LeaseRow.epoch == self.epoch,
                )
                .values(expires_at=0.0)
                .execution_options(synchronize_session=False)
            )
        self.epoch = None
