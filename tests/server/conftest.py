"""Fixtures of the fleet server's tests: a database of each kind, made fresh.

SQLite always; PostgreSQL on the machine's server (``EDGE_TEST_POSTGRES``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``): a new database per test run,
dropped at the end. Where none answers the PostgreSQL tests are skipped, and say so;
with ``EDGE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fleet.server.db import Database

POSTGRES_ENV = "EDGE_TEST_POSTGRES"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class PostgresServer:
    """Makes fresh databases on one PostgreSQL server and drops them at the end."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self._admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        self.made: list[str] = []

    def check(self) -> None:
        with self._admin.connect() as c:
            c.execute(text("SELECT 1"))

    def fresh(self) -> str:
        name = f"edge_fleet_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with self._admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.made.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self._admin.connect() as c:
            for name in self.made:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES))
    try:
        server.check()
    except Exception as exc:
        reason = f"no PostgreSQL answers at {server.url.render_as_string()}: {exc}"
        if os.environ.get("EDGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield server
    server.drop_all()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind (not migrated)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.fresh()


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database of each kind."""
    db = Database(db_url)
    db.migrate()
    yield db
    db.close()


# Each phase's report of a test, for fixtures that act on a failure in their teardown
# (the dashboard tests save a screenshot): the pytest documentation's recipe.
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def failed_so_far(request: pytest.FixtureRequest) -> Callable[[], bool]:
    """Whether this test's setup or call has failed so far (ask it in a teardown)."""
    return lambda: any(r.failed for r in request.node.stash.get(PHASE_REPORTS, {}).values())
