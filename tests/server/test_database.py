"""The schema as Alembic makes it, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from fleet.server.db import Database, DatabaseError
from fleet.server.db.database import MIGRATIONS
from fleet.server.db.schema import (
    Base,
    Desired,
    Device,
    DevicePipeline,
    Rollout,
    RolloutDevice,
    TelemetryMinute,
)
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


HEAD = "0003"


def migrate_to(database: Database, revision: str) -> None:
    """The schema as the server of ``revision`` made it (``Database.migrate``'s way)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


# A rollout, its desired row and a device's row, as a 0001 server wrote them.
ROWS_0001 = [
    "INSERT INTO rollouts (id, model, version, pipeline, target_kind, target, state, plan,"
    " current_wave, previous, message, created_at, created_by, updated_at, finished_at)"
    " VALUES ('r-1', 'digits', '2', 'door', 'group', 'kitchen', 'running',"
    " '{\"waves\": 1, \"wave_count\": 1}', 0, NULL, '', 1.0, 'alice', 1.0, NULL)",
    "INSERT INTO desired (target_kind, target, model, version, pipeline, rollout_id, set_at,"
    " set_by) VALUES ('group', 'kitchen', 'digits', '2', 'door', 'r-1', 1.0, 'alice')",
    "INSERT INTO rollout_devices (rollout_id, device_id, wave, status, attempts, message,"
    " next_attempt_at, updated_at) VALUES ('r-1', 'pi-a', 0, 'sent', 1, '', 0.0, 1.0)",
]


def test_the_health_checks_migration_upgrades_a_0001_database_with_its_rows(
    db_url: str,
) -> None:
    """0002 adds shadow and min_agreement to rollouts and desired state: every row a 0001
    server wrote is still there (the rollout's devices too: no table was recreated
    under them), and the new columns are null (each device's config, as before)."""
    database = Database(db_url)
    try:
        migrate_to(database, "0001")
        with database.engine.begin() as c:
            for statement in ROWS_0001:
                c.execute(text(statement))
        database.migrate()
        with database.engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
        with database.session() as s:
            rollout = s.get(Rollout, "r-1")
            assert rollout is not None and rollout.plan == {"waves": 1, "wave_count": 1}
            assert (rollout.version, rollout.shadow, rollout.min_agreement) == ("2", None, None)
            (desired,) = s.query(Desired).all()
            assert (desired.rollout_id, desired.shadow, desired.min_agreement) == (
                "r-1",
                None,
                None,
            )
            row = s.get(RolloutDevice, ("r-1", "pi-a"))
            assert row is not None and (row.status, row.attempts) == ("sent", 1)
            rollout.shadow, rollout.min_agreement = False, 0.75
        with database.session() as s:
            again = s.get(Rollout, "r-1")
            assert again is not None and (again.shadow, again.min_agreement) == (False, 0.75)
    finally:
        database.close()


# A device whose retained state carries a drift warning on one of its pipelines (one
# pipeline malformed, as no agent sends it), and a minute of its telemetry, as a 0002
# server wrote them.
STATE_0002 = (
    '{"device": "pi-a", "online": true, "pipelines": ['
    '{"name": "door", "model": "digits", "status": "running", "drift": "PSI 0.41 over 0.25"},'
    ' {"name": "hall", "status": "stopped"}, {"status": "running"}]}'
)
ROWS_0002 = [
    "INSERT INTO devices (id, first_seen, last_seen, online, status, groups, state)"
    f" VALUES ('pi-a', 1.0, 2.0, true, 'ok', '[]', '{STATE_0002}')",
    "INSERT INTO devices (id, first_seen, last_seen, online, status, groups, state)"
    " VALUES ('pi-b', 1.0, 2.0, false, 'offline', '[]', NULL)",
    "INSERT INTO telemetry_minutes (device_id, pipeline, minute, samples, fps_sum,"
    " invoke_p95_sum, wait_p95_sum, preprocess_p95_sum, postprocess_p95_sum,"
    " latency_samples, errors, dropped, source_failures, cpu_sum, outbox_dropped,"
    " outbox_depth_max) VALUES ('pi-a', 'door', 100, 3, 30.0, 12.0, 0, 0, 0, 3, 0, 0, 0,"
    " 0, 0, 0)",
]


def test_the_drift_migration_upgrades_a_0002_database_with_its_rows(db_url: str) -> None:
    """0003 adds drift_max to the telemetry minutes (null in the minutes before it) and
    fills device_pipelines from the stored states, drift warnings included."""
    database = Database(db_url)
    try:
        migrate_to(database, "0002")
        with database.engine.begin() as c:
            for statement in ROWS_0002:
                c.execute(text(statement))
        database.migrate()
        with database.engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
        with database.session() as s:
            minute = s.get(TelemetryMinute, ("pi-a", "door", 100))
            assert minute is not None and (minute.samples, minute.drift_max) == (3, None)
            rows = s.query(DevicePipeline).order_by(DevicePipeline.pipeline).all()
            assert [(r.device_id, r.pipeline, r.model, r.status, r.drift) for r in rows] == [
                ("pi-a", "door", "digits", "running", "PSI 0.41 over 0.25"),
                ("pi-a", "hall", None, "stopped", None),
            ]
            minute.drift_max = 0.2
        with database.session() as s:
            again = s.get(TelemetryMinute, ("pi-a", "door", 100))
            assert again is not None and again.drift_max == 0.2
    finally:
        database.close()
