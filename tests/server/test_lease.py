"""The reconciler lease on both databases: two holders, one fake clock."""

from __future__ import annotations

from fleet.server.db import Database
from fleet.server.db.schema import Lease as LeaseRow
from fleet.server.lease import Lease

from .rollout_support import Clock


def lease_row(database: Database) -> tuple[str, float, int]:
    with database.session() as s:
        row = s.get(LeaseRow, "reconciler")
        assert row is not None
        return row.holder, row.expires_at, row.epoch


def test_one_holder_at_a_time_and_a_takeover_when_it_expires(database: Database) -> None:
    clock = Clock()
    a = Lease(database, "reconciler", "server-a", 10.0, clock=clock)
    b = Lease(database, "reconciler", "server-b", 10.0, clock=clock)
    assert a.acquire() and a.held()
    assert not b.acquire() and not b.held()
    assert lease_row(database) == ("server-a", clock() + 10, 1)

    clock.advance(9)
    assert a.acquire()  # renewed: same epoch, later expiry
    assert lease_row(database) == ("server-a", clock() + 10, 1)
    clock.advance(9)
    assert not b.acquire()

    clock.advance(1.5)  # server-a died: its lease ran out
    assert not a.held()
    assert b.acquire() and b.held()
    assert lease_row(database) == ("server-b", clock() + 10, 2)
    assert b.takeovers == 1
    # The old holder cannot renew a lease another took, and knows it.
    assert not a.acquire() and not a.held()


def test_held_sees_a_takeover_the_holder_did_not_notice(database: Database) -> None:
    clock = Clock()
    a = Lease(database, "reconciler", "server-a", 10.0, clock=clock)
    b = Lease(database, "reconciler", "server-b", 10.0, clock=clock)
    assert a.acquire()
    clock.advance(11)
    assert b.acquire()
    # server-a stalled (no acquire since): it learns from held() before acting.
    assert not a.held()
    assert a.epoch is None


def test_release_lets_another_take_it_at_once(database: Database) -> None:
    clock = Clock()
    a = Lease(database, "reconciler", "server-a", 10.0, clock=clock)
    b = Lease(database, "reconciler", "server-b", 10.0, clock=clock)
    assert a.acquire()
    a.release()
    assert not a.held()
    assert b.acquire()
    assert lease_row(database)[0::2] == ("server-b", 2)
    b.release()
    assert a.acquire()  # back to server-a: a new epoch again
    assert lease_row(database)[0::2] == ("server-a", 3)
