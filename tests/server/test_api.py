"""The fleet server's HTTP API, over a real uvicorn on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet.client import ServerClient, ServerError
from fleet.server.api.health import healthz
from fleet.server.artifacts import ArtifactStore
from fleet.server.config import ServerConfig
from fleet.server.context import ServerContext
from fleet.server.db import Database
from fleet.server.db.schema import (
    AuditEntry,
    BundleRecord,
    CommandRecord,
    DevicePipeline,
    Event,
    ReplyRecord,
    Rollout,
    RolloutDevice,
    TelemetryMinute,
    VersionHistory,
)
from tests.fleet_support import make_bundle
from tests.server.api_support import ApiServer, add_device

MODEL = bytes(range(256)) * 40  # 10 KiB; the server never parses it


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(database, tmp_path).start()
    yield server
    server.stop()


def client(api: ApiServer, token: str | None = None) -> ServerClient:
    return ServerClient(api.url, api.operator if token is None else token, timeout=10)


def signed_bundle(api: ApiServer, tmp: Path, version: str = "1", model: bytes = MODEL) -> Path:
    return make_bundle(tmp / f"b{version}-{len(model)}", model, version=version, keys=api.keys)


def stored(api: ApiServer) -> list[str]:
    """What the artifact store holds: bundle directories and uploads in progress."""
    return sorted(p.name for p in api.store.dir.iterdir() if p.name != ".incoming") + sorted(
        p.name for p in (api.store.dir / ".incoming").iterdir()
    )


# ---------------------------------------------------------------- auth, OpenAPI


def test_openapi_is_served_without_cdn_pages(api: ApiServer) -> None:
    doc = api.request("GET", "/openapi.json").json()
    assert {"/api/devices", "/api/bundles", "/api/commands", "/healthz"} <= set(doc["paths"])
    assert api.request("GET", "/docs").status == 404
    assert api.request("GET", "/redoc").status == 404


def test_a_token_is_required_and_checked(api: ApiServer) -> None:
    answer = api.request("GET", "/api/devices")
    assert answer.status == 401
    assert "bearer token is required" in answer.detail
    assert api.request("GET", "/api/devices", token="eft_nope").detail == "unknown or revoked token"
    assert api.request("GET", "/api/devices", token=api.reader).status == 200


def test_read_tokens_are_refused_on_every_write_route(api: ApiServer) -> None:
    doc = api.request("GET", "/openapi.json").json()
    writes = [
        (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method in ops
        if method in ("post", "put", "patch", "delete")
    ]
    assert ("POST", "/api/bundles") in writes and ("POST", "/api/commands") in writes
    for method, path in writes:
        concrete = path.replace("{", "").replace("}", "")  # /api/x/{id} -> /api/x/id
        answer = api.request(method, concrete, token=api.reader, body={})
        assert answer.status == 403, (method, path, answer.status, answer.body)
        assert "read-only" in answer.detail
        assert api.request(method, concrete, body={}).status == 401, (method, path)
    with api.database.session() as s:
        assert s.scalars(select(AuditEntry)).all() == []


# ---------------------------------------------------------------------- bundles


def test_a_signed_bundle_is_uploaded_once_and_described(api: ApiServer, tmp_path: Path) -> None:
    bundle = signed_bundle(api, tmp_path)
    first = client(api).upload_bundle(bundle)
    assert first["name"] == "digits" and first["version"] == "1" and first["size"] == len(MODEL)
    assert first["signer"] is not None and first["uploaded_by"] == "ops"
    assert (api.store.dir / first["sha256"] / "model.tflite").read_bytes() == MODEL
    # Again: the same answer, nothing new.
    assert client(api).upload_bundle(bundle) == first
    # The same version with another model file is a conflict.
    other = signed_bundle(api, tmp_path, model=MODEL + b"!")
    with pytest.raises(ServerError) as err:
        client(api).upload_bundle(other)
    assert err.value.status == 409 and "exists with another model file" in str(err.value)
    assert stored(api) == [first["sha256"]]

    add_device(api.database, "cam-1", models={"digits": "1"})
    add_device(api.database, "cam-2", models={"digits": "0"})
    detail = client(api, api.reader).bundle("digits", "1")
    assert detail["manifest"]["model"]["sha256"] == first["sha256"]
    assert detail["running"] == {"1": 1, "0": 1}
    listed = api.request("GET", "/api/bundles?name=digits", token=api.reader).json()
    assert [b["version"] for b in listed] == ["1"]
    assert api.request("GET", "/api/bundles/digits/9", token=api.reader).status == 404
    with api.database.session() as s:
        assert len(s.scalars(select(BundleRecord)).all()) == 1
        (entry,) = s.scalars(select(AuditEntry)).all()
        assert (entry.actor, entry.action, entry.target) == ("ops", "bundle.upload", "digits/1")


def _multipart(
    fields: dict[str, bytes], boundary: str = "b0undary"
) -> tuple[bytes, dict[str, str]]:
    body = b""
    for name, content in fields.items():
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}"\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_bad_uploads_are_refused_in_one_line_leaving_nothing(
    api: ApiServer, tmp_path: Path
) -> None:
    good = signed_bundle(api, tmp_path)
    manifest = (good / "manifest.json").read_bytes()
    signature = (good / "manifest.sig").read_bytes()
    unsigned = {"manifest": manifest, "model": MODEL}
    tampered = {"manifest": manifest, "signature": signature, "model": MODEL[:-1] + b"\x00"}
    data = json.loads(manifest)
    data["version"] = "2"  # the signature no longer covers it
    resigned = {"manifest": json.dumps(data).encode(), "signature": signature, "model": MODEL}
    malformed = {"manifest": b'{"name": "digits"}', "model": MODEL}
    oversize = {"manifest": manifest, "signature": signature, "model": b"\0" * (1 << 20)}
    cases = [
        (unsigned, 422, "not signed"),
        (tampered, 422, "does not match manifest"),
        (resigned, 422, "does not verify"),
        (malformed, 422, "invalid manifest: version: required key missing"),
        (oversize, 413, "exceeds http.max_upload_mb (1)"),
        ({"manifest": manifest}, 400, "form field 'model' missing"),
        ({**unsigned, "extra": b"x"}, 400, "unknown form field 'extra'"),
    ]
    for fields, status, needle in cases:
        body, headers = _multipart(fields)
        answer = api.request("POST", "/api/bundles", token=api.operator, data=body, headers=headers)
        assert answer.status == status, (needle, answer.body)
        assert needle in answer.detail and "\n" not in answer.detail, answer.detail
        assert stored(api) == []
    answer = api.request("POST", "/api/bundles", token=api.operator, body={"manifest": "x"})
    assert answer.status == 415 and "multipart/form-data" in answer.detail
    # A body bigger than declared is cut at the limit too (no Content-Length to trust).
    body, headers = _multipart(oversize)
    chunks = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    answer = api.request("POST", "/api/bundles", token=api.operator, data=chunks, headers=headers)
    assert answer.status == 413 and "exceeds" in answer.detail
    # The client reads the refusal though the server answers before the body is sent.
    big = make_bundle(tmp_path / "big", b"\0" * (3 << 20), version="9", keys=api.keys)
    with pytest.raises(ServerError) as err:
        client(api).upload_bundle(big)
    assert err.value.status == 413 and "exceeds http.max_upload_mb (1)" in str(err.value)
    assert stored(api) == []
    with api.database.session() as s:
        assert s.scalars(select(BundleRecord)).all() == []


def test_model_files_are_served_with_ranges(api: ApiServer, tmp_path: Path) -> None:
    sha = client(api).upload_bundle(signed_bundle(api, tmp_path))["sha256"]
    path = f"/artifacts/{sha}/model.tflite"
    full = api.request("GET", path)  # no token: devices have none
    assert full.status == 200 and full.body == MODEL
    part = api.request("GET", path, headers={"Range": "bytes=10-19"})
    assert part.status == 206 and part.body == MODEL[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(MODEL)}"
    tail = api.request("GET", path, headers={"Range": f"bytes={len(MODEL) - 5}-"})
    assert tail.status == 206 and tail.body == MODEL[-5:]
    assert api.request("GET", path, headers={"Range": f"bytes={len(MODEL) + 5}-"}).status == 416
    head = api.request("HEAD", path)
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(MODEL))
    assert api.request("GET", f"/artifacts/{'0' * 64}/model.tflite").status == 404
    assert api.request("GET", "/artifacts/../model.tflite").status == 404
    # A directory in the store that no bundle record names is not served.
    stray = "ab" * 32
    shutil.copytree(api.store.dir / sha, api.store.dir / stray)
    assert api.request("GET", f"/artifacts/{stray}/model.tflite").status == 404


# ---------------------------------------------------------------------- devices


def _fleet(database: Database, n: int = 300) -> None:
    for i in range(n):
        add_device(
            database,
            f"cam-{i:03d}",
            online=i % 3 != 0,
            status=("ok", "degraded", "offline")[i % 3],
            groups=("kitchen",) if i % 2 == 0 else ("door", "lab"),
            models={"digits": "2" if i % 5 == 0 else "1"},
            fps=None if i % 7 == 0 else float(i % 50),
            p95=float(i),
            last_seen=1_000_000.0 + i,
        )


def test_device_list_pages_sorts_and_filters(api: ApiServer) -> None:
    _fleet(api.database)
    c = client(api, api.reader)
    page = c.devices(limit=50)
    assert page["total"] == 300 and len(page["devices"]) == 50
    assert page["devices"][0]["id"] == "cam-000"
    row = c.devices(q="cam-010")["devices"][0]
    assert row == {
        "id": "cam-010",
        "online": True,
        "status": "degraded",
        "groups": ["kitchen"],
        "models": {"digits": "2"},
        "fps": 10.0,
        "invoke_p95_ms": 10.0,
        "last_seen": 1_000_010.0,
        "agent_version": "0.9.0",
    }
    everything = [d["id"] for d in c.all_devices()]
    assert everything == sorted(everything) and len(set(everything)) == 300
    paged = [
        d["id"] for off in range(0, 300, 70) for d in c.devices(limit=70, offset=off)["devices"]
    ]
    assert paged == everything
    by_fps = c.devices(sort="-fps", limit=300)["devices"]
    fps = [d["fps"] for d in by_fps]
    assert fps[0] == 49.0 and fps[-1] is None  # no figure sorts last either way
    assert [f for f in fps if f is not None] == sorted(
        (f for f in fps if f is not None), reverse=True
    )
    assert c.devices(sort="last_seen", limit=1)["devices"][0]["id"] == "cam-000"
    assert c.devices(sort="-last_seen", limit=1)["devices"][0]["id"] == "cam-299"
    assert c.devices(group="kitchen")["total"] == 150
    assert c.devices(group="lab", status="ok")["total"] == len(
        [i for i in range(300) if i % 2 == 1 and i % 3 == 0]
    )
    assert c.devices(model="digits", version="2")["total"] == 60
    assert c.devices(online=False)["total"] == 100
    assert c.devices(q="-29")["total"] == 10
    assert c.devices(q="%")["total"] == 0  # LIKE wildcards are text
    with pytest.raises(ServerError) as err:
        c.devices(sort="temperature")
    assert err.value.status == 422 and str(err.value).count("query.sort:") == 1
    groups = c.groups()
    assert {g["group"]: (g["devices"], g["online"]) for g in groups} == {
        "door": (150, 100),
        "kitchen": (150, 100),
        "lab": (150, 100),
    }


def test_one_device_with_its_history_and_pending_rollout(api: ApiServer) -> None:
    db = api.database
    add_device(db, "cam-1", groups=("door",), models={"digits": "1"})
    with db.session() as s:
        s.add(VersionHistory(device_id="cam-1", model="digits", version="0", started=1, ended=5))
        s.add(VersionHistory(device_id="cam-1", model="digits", version="1", started=5, ended=None))
        s.add(Event(ts=5, device_id="cam-1", kind="version", message="digits 0 -> 1"))
        s.add(
            CommandRecord(
                id="dep-1", device_id="cam-1", op="deploy", body={}, created_at=4,
                created_by="reconciler", status="done", code="ok", message="",
            )
        )  # fmt: skip
        s.add(
            Rollout(
                id="r-1", model="digits", version="2", target_kind="group", target="door",
                state="running", plan={}, created_at=6, created_by="ops", updated_at=6,
            )
        )  # fmt: skip
        s.flush()
        s.add(
            RolloutDevice(
                rollout_id="r-1", device_id="cam-1", wave=0, status="pending", updated_at=6
            )
        )
    c = client(api, api.reader)
    d = c.device("cam-1")
    assert d["models"][0]["name"] == "digits" and d["models"][0]["active"] == "1"
    assert d["pipelines"] == [{"name": "door", "model": "digits", "status": "running"}]
    assert [(r["rollout_id"], r["status"]) for r in d["rollouts"]] == [("r-1", "pending")]
    h = c.history("cam-1")
    assert [(v["version"], v["ended"]) for v in h["versions"]] == [("1", None), ("0", 5)]
    assert [(x["id"], x["status"], x["code"]) for x in h["commands"]] == [("dep-1", "done", "ok")]
    assert [e["kind"] for e in h["events"]] == ["version"]
    events = api.request("GET", "/api/events?device=cam-1&kind=version", token=api.reader).json()
    assert [e["message"] for e in events] == ["digits 0 -> 1"]
    with pytest.raises(ServerError) as err:
        c.device("cam-9")
    assert err.value.status == 404 and "unknown device 'cam-9'" in str(err.value)


def test_telemetry_series_per_minute_and_coarser(api: ApiServer) -> None:
    add_device(api.database, "cam-1")
    with api.database.session() as s:
        for minute in range(100, 110):
            s.add(
                TelemetryMinute(
                    device_id="cam-1", pipeline="", minute=minute, samples=2,
                    fps_sum=2.0 * minute, invoke_p95_sum=20.0, invoke_p95_max=12.0 + minute % 5,
                    wait_p95_sum=2.0, preprocess_p95_sum=4.0, postprocess_p95_sum=1.0,
                    latency_samples=2, errors=minute - 100, dropped=1,
                    temperature_c_max=61.0,
                    drift_max=None if minute == 100 else (minute - 100) / 100,
                )
            )  # fmt: skip
        s.add(TelemetryMinute(
            device_id="cam-1", pipeline="door", minute=100, samples=1, fps_sum=7, drift_max=0.3
        ))  # fmt: skip
    q = "/api/devices/cam-1/telemetry?since=6000&until=6599"
    points = api.request("GET", q, token=api.reader).json()["points"]
    assert len(points) == 10
    assert points[0] == {
        "ts": 6000,
        "samples": 2,
        "fps": 100.0,
        "invoke_p95_ms": 10.0,
        "invoke_p95_max_ms": 12.0,
        "wait_p95_ms": 1.0,
        "preprocess_p95_ms": 2.0,
        "postprocess_p95_ms": 0.5,
        "errors": 0,
        "dropped": 1,
        "source_state": None,
        "source_failures": 0,
        "drift_max": None,  # no figure in that minute stays no figure
        "cpu_percent": 0.0,
        "mem_rss_mb_max": None,
        "temperature_c_max": 61.0,
        "outbox_depth_max": 0,
        "outbox_dropped": 0,
    }
    coarse = api.request("GET", q + "&step=300", token=api.reader).json()["points"]
    assert [
        (p["ts"], p["samples"], p["fps"], p["invoke_p95_max_ms"], p["errors"], p["drift_max"])
        for p in coarse
    ] == [
        (6000, 10, 102.0, 16.0, 4, 0.04),
        (6300, 10, 107.0, 16.0, 9, 0.09),
    ]
    door = api.request("GET", q + "&pipeline=door", token=api.reader).json()["points"]
    assert [(p["ts"], p["fps"], p["drift_max"]) for p in door] == [(6000, 7.0, 0.3)]
    assert "cpu_percent" not in door[0]
    bad = api.request("GET", q + "&step=90", token=api.reader)
    assert bad.status == 422 and bad.detail.startswith("query.step:")


# --------------------------------------------------------------------- commands


def test_commands_are_recorded_sent_and_audited(api: ApiServer) -> None:
    for d in ("cam-1", "cam-2", "cam-3"):
        add_device(
            api.database, d, groups=("door",) if d != "cam-3" else (), models={"digits": "2"}
        )
    c = client(api)
    sent = c.send_command({"op": "rollback", "group": "door", "to_version": "1"})
    assert [row["device"] for row in sent["commands"]] == ["cam-1", "cam-2"]
    assert [(d, cmd.op, cmd.model, cmd.to_version) for d, cmd in api.sender.sent] == [
        ("cam-1", "rollback", "digits", "1"),
        ("cam-2", "rollback", "digits", "1"),
    ]
    assert [cmd.id for _, cmd in api.sender.sent] == [row["id"] for row in sent["commands"]]
    cid = sent["commands"][0]["id"]
    with api.database.session() as s:
        row = s.get(CommandRecord, cid)
        assert row is not None and row.created_by == "ops" and row.published_at is not None
        s.add(
            ReplyRecord(
                command_id=cid, device_id="cam-1", status="done", code="ok", ts=1, received_at=2
            )
        )
        (entry,) = s.scalars(select(AuditEntry)).all()
        assert (entry.actor, entry.action, entry.target) == (
            "ops",
            "command.rollback",
            "group/door",
        )
    got = c.command(cid)
    assert got["device"] == "cam-1" and got["body"]["to_version"] == "1"
    assert [(r["status"], r["code"]) for r in got["replies"]] == [("done", "ok")]
    assert {x["id"] for x in c.commands([cid])} == {cid}

    ping = c.send_command({"op": "ping", "device": "cam-3", "expires_s": 30})
    assert api.sender.sent[-1][0] == "cam-3" and api.sender.sent[-1][1].op == "ping"
    assert ping["commands"][0]["id"] == api.sender.sent[-1][1].id

    problems = [
        ({"op": "ping"}, "body: Value error, give exactly one of device or group"),
        ({"op": "ping", "device": "cam-1", "group": "door"}, "give exactly one"),
        ({"op": "rollback", "device": "cam-1", "to_version": "v 2"}, "body.to_version:"),
        ({"op": "reboot", "device": "cam-1"}, "body.op: Input should be"),
        ({"op": "ping", "device": "cam-1", "when": 1}, "body.when: unknown key"),
        ({"op": "config", "device": "cam-1"}, "body.changes:"),
        ({"op": "ping", "group": "nobody"}, "no device is in group 'nobody'"),
        ({"op": "ping", "device": "cam-9"}, "unknown device 'cam-9'"),
    ]
    before = len(api.sender.sent)
    for body, needle in problems:
        answer = api.request("POST", "/api/commands", token=api.operator, body=body)
        assert answer.status in (404, 422), (body, answer.body)
        assert needle in answer.detail and "\n" not in answer.detail, answer.detail
    assert len(api.sender.sent) == before
    api.sender.refuse = True
    answer = api.request(
        "POST", "/api/commands", token=api.operator, body={"op": "ping", "device": "cam-1"}
    )
    assert answer.status == 503 and "broker refused" in answer.detail
    audit = api.request("GET", "/api/audit?actor=ops", token=api.reader).json()
    assert [a["action"] for a in audit][-2:] == ["command.ping", "command.rollback"]


def test_commands_need_the_mqtt_link(database: Database, tmp_path: Path) -> None:
    server = ApiServer(database, tmp_path)
    server.ctx.sender = None
    server.start()
    try:
        add_device(database, "cam-1")
        answer = server.request(
            "POST", "/api/commands", token=server.operator, body={"op": "ping", "device": "cam-1"}
        )
        assert answer.status == 503 and "no MQTT link" in answer.detail
    finally:
        server.stop()


# ------------------------------------------------------------------ health, metrics


def test_health_and_metrics(api: ApiServer) -> None:
    add_device(api.database, "cam-1", status="ok")
    add_device(api.database, "cam-2", status="degraded", online=False)
    with api.database.session() as s:
        s.add(DevicePipeline(device_id="cam-1", pipeline="door", status="running", drift="PSI"))
        s.add(DevicePipeline(device_id="cam-2", pipeline="door", status="running", drift=None))
    health = api.request("GET", "/healthz")
    assert health.status == 200
    assert health.json() == {
        "ok": True,
        "database": api.database.dialect,
        "ingest_msgs_per_s": 12.5,
        "reconcile_lag_s": 0.25,
    }
    api.figures["state"] = "not a number"
    text = api.request("GET", "/metrics").body.decode()
    assert 'edge_fleet_devices{status="ok"} 1.0' in text
    assert 'edge_fleet_devices{status="degraded"} 1.0' in text
    assert 'edge_fleet_devices{status="offline"} 0.0' in text
    assert "edge_fleet_devices_online 1.0" in text
    assert "edge_fleet_pipelines_drifting 1.0" in text  # fleet-wide: no device label
    assert 'edge_fleet_rollouts{state="running"} 0.0' in text
    assert "edge_fleet_ingest_msgs_per_s 12.5" in text
    assert "not a number" not in text


def test_health_says_when_the_database_does_not_answer(tmp_path: Path) -> None:
    dead = Database("postgresql+psycopg://postgres@127.0.0.1:1/none")
    ctx = ServerContext(ServerConfig(), dead, ArtifactStore(tmp_path), [], None)
    answer = asyncio.run(healthz(ctx))
    assert answer.status_code == 503
    body = json.loads(answer.body)
    assert body["ok"] is False and "cannot reach" in body["detail"]
