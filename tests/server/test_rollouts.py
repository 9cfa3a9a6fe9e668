"""Rollouts as objects (create, gates, abort, retry, the view) on both databases, and
their HTTP routes through a real uvicorn."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select

from fleet.server.app import create_app
from fleet.server.artifacts import ArtifactStore
from fleet.server.auth import create_token
from fleet.server.config import ServerConfig
from fleet.server.context import ServerContext
from fleet.server.db import Database
from fleet.server.db.schema import AuditEntry, Desired, Rollout
from fleet.server.rollouts import (
    NotFound,
    RolloutError,
    abort,
    approve,
    pause,
    resume,
    retry_device,
    rollout_view,
    rollouts_by_state,
)
from tests.mqtt_support import free_port

from .rollout_support import Clock, add_bundle, add_device, start_rollout, statuses


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ------------------------------------------------------------------- create


def test_waves_are_planned_from_the_group_with_the_canary_first(
    database: Database, clock: Clock
) -> None:
    add_bundle(database, "2")
    for d in ("a", "b", "c", "d", "e"):
        add_device(database, d, online=d != "a")
    add_device(database, "other", groups=("garage",))
    rid = start_rollout(database, clock, "2", canary="20%", waves=2)
    with database.session() as s:
        view = rollout_view(s, rid)
    assert view["state"] == "running" and view["plan"]["wave_count"] == 3
    assert [(d["device"], d["wave"], d["status"]) for d in view["devices"]] == [
        ("b", 0, "pending"),  # online first
        ("a", 1, "waiting"),
        ("c", 1, "waiting"),
        ("d", 2, "waiting"),
        ("e", 2, "waiting"),
    ]
    assert [w["counts"] for w in view["waves"]] == [{"pending": 1}, {"waiting": 2}, {"waiting": 2}]
    assert view["previous"] is None
    with database.session() as s:
        desired = s.scalar(select(Desired))
        assert desired is not None
        assert (desired.target, desired.version, desired.pipeline, desired.rollout_id) == (
            "kitchen",
            "2",
            "door",
            rid,
        )


def test_an_empty_group_waits_for_joiners(database: Database, clock: Clock) -> None:
    add_bundle(database, "2")
    rid = start_rollout(database, clock, "2", target="empty", canary="1", waves=3)
    with database.session() as s:
        view = rollout_view(s, rid)
    assert view["devices"] == [] and view["plan"]["wave_count"] == 1


def test_a_new_rollout_supersedes_the_unfinished_one_and_remembers_it(
    database: Database, clock: Clock
) -> None:
    add_bundle(database, "2")
    add_bundle(database, "3")
    add_device(database, "a")
    first = start_rollout(database, clock, "2")
    clock.advance(5)
    second = start_rollout(database, clock, "3")
    with database.session() as s:
        old, new = s.get(Rollout, first), s.get(Rollout, second)
        assert old is not None and new is not None
        assert (old.state, old.message) == ("superseded", f"superseded by {second}")
        assert new.previous == {
            "version": "2",
            "pipeline": "door",
            "rollout_id": first,
            "shadow": None,
            "min_agreement": None,
        }
        assert len(s.scalars(select(Desired)).all()) == 1
        counts = rollouts_by_state(s)
    assert counts["superseded"] == 1 and counts["running"] == 1 and counts["done"] == 0


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"canary": "0"}, "canary", 422),
        ({"waves": 0}, "waves", 422),
        ({"max_failures": -1}, "max_failures", 422),
        ({"target": "no/slash"}, "group", 422),
        ({"target_kind": "device", "target": "group"}, "device", 422),
        ({"target_kind": "site"}, "target_kind", 422),
        ({"version": "9"}, "version", 409),
        ({"pipeline": "a b"}, "pipeline", 422),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(
    database: Database, clock: Clock, change: dict[str, Any], field: str, status: int
) -> None:
    add_bundle(database, "2")
    args = dict(change)
    version = args.pop("version", "2")
    with pytest.raises(RolloutError) as err:
        start_rollout(database, clock, version, **args)
    assert (err.value.field, err.value.status) == (field, status)
    assert str(err.value).startswith(f"{field}: ")
    with database.session() as s:
        assert s.scalars(select(Rollout)).all() == []
        assert s.scalars(select(Desired)).all() == []


# ------------------------------------------------------------------- gates


def test_transitions_that_make_no_sense_are_refused(database: Database, clock: Clock) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    now = clock()
    with database.session() as s:
        with pytest.raises(RolloutError, match="cannot approve .* it is running, not waiting"):
            approve(s, rid, now=now)
        with pytest.raises(RolloutError, match="cannot resume"):
            resume(s, rid, now=now)
        with pytest.raises(RolloutError, match="has not given up"):
            retry_device(s, rid, "a", now=now)
        with pytest.raises(NotFound, match="'nope'"):
            retry_device(s, rid, "nope", now=now)
        with pytest.raises(NotFound):
            pause(s, "r-unknown", now=now)
        pause(s, rid, now=now)
        with pytest.raises(RolloutError, match="cannot pause"):
            pause(s, rid, now=now)
        abort(s, rid, actor="alice", now=now)
        with pytest.raises(RolloutError, match="cannot abort .* it is aborted") as err:
            abort(s, rid, actor="alice", now=now)
        assert err.value.status == 409


def test_abort_reinstates_the_previous_rollout_with_every_wave_open(
    database: Database, clock: Clock
) -> None:
    add_bundle(database, "1")
    add_bundle(database, "2")
    for d in ("a", "b", "c"):
        add_device(database, d)
    first = start_rollout(database, clock, "1", canary="1")
    second = start_rollout(database, clock, "2")
    with database.session() as s:
        abort(s, second, actor="bob", now=clock())
    with database.session() as s:
        old = s.get(Rollout, first)
        assert old is not None and old.state == "done"
    assert set(statuses(database, first).values()) == {"pending"}


# ------------------------------------------------------------------- HTTP


class Api:
    def __init__(self, base: str, operator: str, reader: str) -> None:
        self.base, self.operator, self.reader = base, operator, reader

    def call(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.operator}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@contextmanager
def serving(database: Database, tmp_path: Path) -> Iterator[str]:
    """The server's app (its error handlers too) over ``database``; yields its URL."""
    app = create_app(
        ServerContext(
            config=ServerConfig(data_dir=tmp_path),
            database=database,
            store=ArtifactStore(tmp_path / "artifacts"),
            trusted_keys=[],
            sender=None,
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, name="test-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.stopping.set()
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Iterator[Api]:
    with database.session() as s:
        operator = create_token(s, "alice", "operator")
        reader = create_token(s, "viewer", "read")
    with serving(database, tmp_path) as url:
        yield Api(url, operator, reader)


def test_rollouts_over_http(api: Api, database: Database) -> None:
    add_bundle(database, "2")
    for d in ("a", "b"):
        add_device(database, d)
    body = {"model": "digits", "version": "2", "group": "kitchen", "canary": "1", "approval": True}
    code, view = api.call("POST", "/api/rollouts", body)
    assert code == 201, view
    rid = view["id"]
    assert view["state"] == "running" and len(view["devices"]) == 2

    assert api.call("GET", f"/api/rollouts/{rid}", token=api.reader)[1]["id"] == rid
    code, page = api.call("GET", "/api/rollouts?state=running&model=digits", token=api.reader)
    assert code == 200 and page["total"] == 1
    assert page["rollouts"][0]["counts"] == {"pending": 1, "waiting": 1}
    assert api.call("GET", "/api/rollouts?state=done")[1]["total"] == 0
    code, desired = api.call("GET", "/api/desired", token=api.reader)
    assert desired["desired"][0]["rollout_id"] == rid

    assert api.call("POST", f"/api/rollouts/{rid}/approve") == (
        409,
        {"detail": f"state: cannot approve rollout {rid}: it is running, not waiting_approval"},
    )
    code, paused = api.call("POST", f"/api/rollouts/{rid}/pause")
    assert code == 200 and paused["state"] == "paused"
    assert api.call("POST", f"/api/rollouts/{rid}/resume")[1]["state"] == "running"
    code, retried = api.call("POST", f"/api/rollouts/{rid}/devices/a/retry")
    assert code == 409 and retried["detail"].startswith("device: ")
    assert api.call("POST", f"/api/rollouts/{rid}/abort")[1]["state"] == "aborted"
    assert api.call("GET", "/api/desired")[1] == {"desired": []}
    with database.session() as s:
        actions = [(e.actor, e.action, e.target) for e in s.scalars(select(AuditEntry))]
    assert actions == [
        ("alice", "rollout.create", rid),
        ("alice", "rollout.pause", rid),
        ("alice", "rollout.resume", rid),
        ("alice", "rollout.abort", rid),
    ]


def test_a_declaration_is_removed_over_http(api: Api, database: Database) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    body = {"model": "digits", "version": "2", "device": "a"}
    code, view = api.call("POST", "/api/rollouts", body)
    assert code == 201, view
    query = "/api/desired?model=digits&device=a"
    assert api.call("DELETE", query, token=api.reader)[0] == 403
    assert api.call("DELETE", "/api/desired?model=digits")[1] == {
        "detail": "query: give exactly one of group and device"
    }
    code, removed = api.call("DELETE", query)
    assert code == 200 and (removed["target"], removed["version"]) == ("a", "2")
    assert api.call("GET", "/api/desired")[1] == {"desired": []}
    assert api.call("GET", f"/api/rollouts/{view['id']}")[1]["state"] == "superseded"
    assert api.call("DELETE", query) == (
        404,
        {"detail": "no desired state of digits for device a"},
    )
    with database.session() as s:
        last = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()
        assert last is not None and (last.action, last.target) == ("desired.remove", "device/a")


def test_http_refuses_bad_requests_with_the_field(api: Api, database: Database) -> None:
    add_bundle(database, "2")
    code, body = api.call(
        "POST", "/api/rollouts", {"model": "digits", "version": "9", "group": "g"}
    )
    assert (code, body) == (
        409,
        {"detail": "version: no bundle digits 9 is stored: upload it first"},
    )
    code, body = api.call(
        "POST", "/api/rollouts", {"model": "digits", "version": "2", "group": "g", "canary": "x"}
    )
    assert code == 422 and body["detail"].startswith("canary: ")
    code, body = api.call(
        "POST", "/api/rollouts", {"model": "digits", "version": "2", "group": "g", "device": "d"}
    )
    assert code == 422 and "exactly one of group and device" in json.dumps(body)
    code, body = api.call(
        "POST", "/api/rollouts", {"model": "digits", "version": "2", "group": "g", "colour": "red"}
    )
    assert code == 422 and "colour" in json.dumps(body)
    code, body = api.call(
        "POST", "/api/rollouts", {"model": "digits", "version": "2", "group": "g"}, api.reader
    )
    assert code == 403
    assert api.call("GET", "/api/rollouts/r-nope")[0] == 404
    assert api.call("POST", "/api/rollouts/r-nope/abort")[0] == 404
    assert api.call("GET", "/api/rollouts?state=bogus")[0] == 422
    with database.session() as s:
        assert s.scalars(select(Rollout)).all() == []
        assert s.scalars(select(AuditEntry)).all() == []


# ------------------------------------------------------------ model-health checks


def test_a_rollout_carries_its_health_checks_and_abort_restores_the_previous_ones(
    database: Database, clock: Clock
) -> None:
    add_bundle(database, "1")
    add_bundle(database, "2")
    add_device(database, "a")
    first = start_rollout(database, clock, "1", shadow=True, min_agreement=0.8)
    second = start_rollout(database, clock, "2", shadow=False)
    with database.session() as s:
        view = rollout_view(s, second)
        assert (view["shadow"], view["min_agreement"]) == (False, None)
        (desired,) = s.scalars(select(Desired)).all()
        assert (desired.shadow, desired.min_agreement) == (False, None)
        abort(s, second, actor="bob", now=clock())
    with database.session() as s:
        (desired,) = s.scalars(select(Desired)).all()
        assert (desired.version, desired.rollout_id) == ("1", first)
        assert (desired.shadow, desired.min_agreement) == (True, 0.8)
        old = s.get(Rollout, first)
        assert old is not None and (old.shadow, old.min_agreement) == (True, 0.8)


def test_min_agreement_out_of_range_is_refused_naming_it(database: Database, clock: Clock) -> None:
    add_bundle(database, "2")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(RolloutError, match="must be 0..1") as err:
            start_rollout(database, clock, "2", min_agreement=bad)
        assert err.value.field == "min_agreement" and err.value.status == 422
    with database.session() as s:
        assert s.scalars(select(Rollout)).all() == []
        assert s.scalars(select(Desired)).all() == []


def test_health_checks_over_http_are_validated_and_kept_across_a_restart(
    api: Api, database: Database, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    body = {"model": "digits", "version": "2", "group": "kitchen"}
    code, refused = api.call("POST", "/api/rollouts", {**body, "min_agreement": 1.5})
    assert code == 422
    assert refused["detail"].startswith("body.min_agreement: "), refused
    code, refused = api.call("POST", "/api/rollouts", {**body, "shadow": "sometimes"})
    assert code == 422 and refused["detail"].startswith("body.shadow: "), refused
    with database.session() as s:
        assert s.scalars(select(Rollout)).all() == []

    code, view = api.call("POST", "/api/rollouts", {**body, "shadow": False, "min_agreement": 0.8})
    assert code == 201, view
    rid = view["id"]
    assert (view["shadow"], view["min_agreement"]) == (False, 0.8)
    code, plain = api.call("POST", "/api/rollouts", {**body, "device": "a", "group": None})
    assert code == 201 and (plain["shadow"], plain["min_agreement"]) == (None, None)
    desired = {d["target"]: d for d in api.call("GET", "/api/desired")[1]["desired"]}
    assert (desired["kitchen"]["shadow"], desired["kitchen"]["min_agreement"]) == (False, 0.8)
    assert (desired["a"]["shadow"], desired["a"]["min_agreement"]) == (None, None)

    # A restarted server (a new process: its own engine, migrating at start) on the
    # same database serves them back.
    restarted = Database(database.url)
    try:
        restarted.migrate()
        with serving(restarted, tmp_path) as url:
            code, again = Api(url, api.operator, api.reader).call("GET", f"/api/rollouts/{rid}")
        assert code == 200 and (again["shadow"], again["min_agreement"]) == (False, 0.8)
    finally:
        restarted.close()
    listed = api.call("GET", "/api/rollouts", token=api.reader)[1]["rollouts"]
    assert {r["id"]: (r["shadow"], r["min_agreement"]) for r in listed} == {
        view["id"]: (False, 0.8),
        plain["id"]: (None, None),
    }
