"""The schema as Alembic makes it, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from fleet.server.db import Database, DatabaseError
from fleet.server.db.schema import Base, Device
from tests.server.conftest import PostgresServer
from tests.server.server_support import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_migrations_make_exactly_the_schema_of_the_models(database: Database) -> None:
    with database.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"schema.py and the migrations differ: {diff}"


def test_migrating_twice_changes_nothing(database: Database) -> None:
    before = sorted(inspect(database.engine).get_table_names())
    database.migrate()
    assert sorted(inspect(database.engine).get_table_names()) == before
    assert "devices" in before and "alembic_version" in before


def test_rows_round_trip_with_json(database: Database) -> None:
    with database.session() as s:
        s.add(Device(id="pi-a", first_seen=1.0, last_seen=2.0, groups=["g"], state={"a": [1]}))
    with database.session() as s:
        got = s.get(Device, "pi-a")
        assert got is not None and got.groups == ["g"] and got.state == {"a": [1]}


def test_a_bad_url_is_one_line() -> None:
    try:
        Database("mysql://nowhere/x")
    except DatabaseError as exc:
        assert "unsupported database 'mysql'" in str(exc)
    else:
        raise AssertionError("mysql was accepted")


MIGRATE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from fleet.server.db import Database
db = Database(sys.argv[1])
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.005)
db.migrate()
"""


def test_processes_migrating_one_fresh_database_at_once_all_succeed(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Server processes started together on one PostgreSQL database: none fails on a
    CREATE TABLE another made first (they take turns on an advisory lock)."""
    url = postgres.fresh()
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_WHEN_TOLD, url, str(go), str(tmp_path / f"ready-{i}")],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    # All three imported and polling for the go file, then off together.
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 3, 60, "three children ready")
    go.touch()
    failures = [c.communicate(timeout=60)[1][-500:] for c in children]
    assert [c.returncode for c in children] == [0, 0, 0], failures
    database = Database(url)
    try:
        assert "devices" in inspect(database.engine).get_table_names()
    finally:
        database.close()
