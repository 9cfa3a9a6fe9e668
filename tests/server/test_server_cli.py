"""``edge-fleet server`` as an operator types it: ``token add|list|revoke``, ``migrate``
(as ``python -m fleet server ...`` processes, on a database of each kind), and the
README's ``server --config configs/fleet-server.example.yaml --db postgresql+psycopg://...``
(its config, with the flags' overrides, starting a real server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, inspect, select, text

from fleet.cli import build_parser
from fleet.server.config import ServerConfig
from fleet.server.db import Database
from fleet.server.db.schema import ApiToken, Base
from fleet.server.main import server_config
from fleet.server.server import FleetServer
from tests.fleet_support import REPO, make_keys
from tests.mqtt_support import Broker, free_port
from tests.server.api_support import ApiServer
from tests.server.conftest import PostgresServer
from tests.server.test_database import HEAD

EXAMPLE = REPO / "configs" / "fleet-server.example.yaml"


def server(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", "server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def refused(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The one line a refused command prints (and nothing on stdout)."""
    assert out.returncode == code, out
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    return line


def tokens(db: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in ok(server(*db, "token", "list")).splitlines()]


def test_tokens_add_list_revoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    db = ["--db", url]
    ci = ok(server(*db, "token", "add", "ci", "--role", "operator")).strip()
    dash = ok(server(*db, "token", "add", "dash")).strip()  # read, by default
    assert ci.startswith("eft_") and dash.startswith("eft_") and ci != dash

    line = refused(server(*db, "token", "add", "ci", "--role", "read"))
    assert line == "edge-fleet server: a token named 'ci' exists already (revoke it first)"
    listed = ok(server(*db, "token", "list"))
    assert ci not in listed and dash not in listed  # names and roles, never the tokens
    assert [json.loads(row) for row in listed.splitlines()] == [
        {"name": "ci", "role": "operator", "revoked": False},
        {"name": "dash", "role": "read", "revoked": False},
    ]

    api = ApiServer(Database(url), tmp_path / "api").start()
    try:
        assert api.request("GET", "/api/devices", token=ci).status == 200
        assert api.request("GET", "/api/devices", token=dash).status == 200
        # The role holds: a read token may not send commands.
        ping = {"op": "ping", "device": "cam-1"}
        assert api.request("POST", "/api/commands", token=dash, body=ping).status == 403
        ok(server(*db, "token", "revoke", "ci"))
        answer = api.request("GET", "/api/devices", token=ci)
        assert (answer.status, answer.detail) == (401, "unknown or revoked token")
        assert api.request("GET", "/api/devices", token=dash).status == 200
    finally:
        api.stop()
    assert {t["name"]: t["revoked"] for t in tokens(db)} == {
        "ci": True,
        "dash": False,
        "ops": False,  # the ApiServer's own
        "viewer": False,
    }
    line = refused(server(*db, "token", "revoke", "nobody"))
    assert line == "edge-fleet server: no token named 'nobody'"
    # A revoked name gets a new token; the old one stays refused.
    fresh = ok(server(*db, "token", "add", "ci", "--role", "read")).strip()
    assert fresh.startswith("eft_") and fresh != ci
    assert {t["name"]: (t["role"], t["revoked"]) for t in tokens(db)}["ci"] == ("read", False)


def test_token_add_as_the_readme_writes_it(tmp_path: Path) -> None:
    """``edge-fleet server token add ci --role operator``, no flags: the default SQLite
    database in ./fleet-data, the one ``edge-fleet server`` then serves."""
    token = ok(server("token", "add", "ci", "--role", "operator", cwd=tmp_path)).strip()
    assert token.startswith("eft_") and len(token.splitlines()) == 1
    assert (tmp_path / "fleet-data" / "fleet.db").is_file()
    assert tokens(["--data-dir", str(tmp_path / "fleet-data")]) == [
        {"name": "ci", "role": "operator", "revoked": False}
    ]


def test_migrate_makes_the_newest_schema_on_an_empty_database(db_url: str) -> None:
    """``server migrate`` on a fresh SQLite file and a fresh PostgreSQL database; again
    is a no-op."""
    engine = create_engine(db_url)
    try:
        assert inspect(engine).get_table_names() == []
        for _ in range(2):
            assert ok(server("--db", db_url, "migrate")) == "database is at the newest schema\n"
        with engine.connect() as c:
            tables = set(inspect(c).get_table_names())
            assert tables == set(Base.metadata.tables) | {"alembic_version"}
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                HEAD
            ]
    finally:
        engine.dispose()


def test_migrate_on_a_database_that_does_not_answer() -> None:
    line = refused(
        server("--db", f"postgresql+psycopg://fleet@127.0.0.1:{free_port()}/fleet", "migrate"),
        code=1,
    )
    assert line.startswith("edge-fleet server: ") and "127.0.0.1" in line


def test_the_readme_server_command_with_the_example_config(
    tmp_path: Path, broker: Broker, postgres: PostgresServer
) -> None:
    """``edge-fleet server --config configs/fleet-server.example.yaml --db
    postgresql+psycopg://...``: the flags override the file; the rest is the example's.
    Then a real server with it (its trusted key and data directory made to exist here)."""
    readme = "postgresql+psycopg://fleet@db/fleet"
    args = build_parser().parse_args(["server", "--config", str(EXAMPLE), "--db", readme])
    config = server_config(args)
    assert config.db == readme
    assert config.data_dir == Path("/var/lib/edge-fleet")
    assert config.trusted_keys == [Path("/etc/edge-fleet/keys/signing.pub")]
    assert (config.http.bind, config.broker.host, config.broker.port) == (
        "127.0.0.1:8400",
        "127.0.0.1",
        1883,
    )
    assert config.broker.share_group == "edge-fleet" and config.reconcile.backoff_s == 30.0

    url, port = postgres.fresh(), free_port()
    args = build_parser().parse_args(
        ["server", "--config", str(EXAMPLE), "--db", url, "--data-dir", str(tmp_path / "data"),
         "--bind", f"127.0.0.1:{port}", "--broker", f"{broker.host}:{broker.port}"]
    )  # fmt: skip
    config = server_config(args)
    assert (config.db, config.data_dir) == (url, tmp_path / "data")
    assert (config.http.bind, config.http.max_upload_mb) == (f"127.0.0.1:{port}", 512)
    assert (config.broker.host, config.broker.port) == (broker.host, broker.port)
    assert config.broker.prefix == "edge" and config.broker.share_group == "edge-fleet"
    keys = make_keys(tmp_path / "keys")
    running = FleetServer(config.model_copy(update={"trusted_keys": [keys.public]}))
    running.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        assert (tmp_path / "data" / "admin.token").is_file()
    finally:
        running.stop()
    with Database(url).session() as s:
        assert s.execute(select(ApiToken.name, ApiToken.role)).all() == [("admin", "operator")]


def test_a_bad_broker_flag_is_a_usage_error(tmp_path: Path) -> None:
    line = refused(server("--data-dir", str(tmp_path), "--broker", "mqtt:eighteen", "migrate"))
    assert line == "edge-fleet server: --broker 'mqtt:eighteen': expected HOST[:PORT]"
    args = build_parser().parse_args(["server", "--broker", "mqtt.example"])
    assert server_config(args).broker.model_dump(include={"host", "port"}) == {
        "host": "mqtt.example",
        "port": ServerConfig().broker.port,
    }
