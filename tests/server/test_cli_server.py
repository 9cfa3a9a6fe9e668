"""edge-fleet's client mode: ``python -m fleet ... --server`` against a real API server.

The API is ``create_app``'s, with the real rollouts router. No reconciler thread runs:
the test ticks a real ``Reconciler`` (commands go to a ``FakeSender``) and folds the
devices' replies into the commands as ingest does, then checks what the CLI shows and
how it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet.client import ServerClient
from fleet.server.db import Database
from fleet.server.db.schema import (
    BundleRecord,
    Device,
    Rollout,
    VersionHistory,
)
from fleet.server.reconcile import Reconciler
from tests.fleet_support import REPO, make_bundle
from tests.mqtt_support import free_port
from tests.server.api_support import ApiServer, add_device
from tests.server.rollout_support import (
    FakeSender,
    complete,
    reconciler,
    reply,
    state_of,
    statuses,
)

MODEL = bytes(range(256)) * 20


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(database, tmp_path, max_upload_mb=4)
    server.start()
    for i in (1, 2):
        add_device(database, f"cam-{i}", groups=("door",), models={"digits": "1"}, fps=9.5 + i)
    add_device(database, "cam-3", groups=("lab",), online=False, status="offline")
    yield server
    server.stop()


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


@pytest.fixture
def reconcile(api: ApiServer, sender: FakeSender, tmp_path: Path) -> Reconciler:
    """The server's reconciler, ticked by the test; one try per device, so a failure
    gives the device up (and halts a rollout with max_failures 0) at once."""
    return reconciler(
        api.database, sender, time.time, tmp_path / "delivery", instance="test", max_attempts=1
    )


@pytest.fixture
def token_file(api: ApiServer, tmp_path: Path) -> str:
    path = tmp_path / "fleet.token"
    path.write_text(api.operator + "\n")
    return str(path)


def fleet_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", str(REPO))
    if token is not None:
        env["EDGE_FLEET_TOKEN"] = token
    return env


def fleet_cmd(api: ApiServer | None, command: str, *args: str) -> list[str]:
    """The command as the README writes it: positional arguments, then ``--server``."""
    server = ["--server", api.url] if api is not None else []
    n = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    return [sys.executable, "-m", "fleet", command, *args[:n], *server, *args[n:]]


def run(
    api: ApiServer | None, command: str, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``edge-fleet COMMAND --server URL ARGS``; the token in the environment (the
    operator's unless given; ``token=""`` for none, with ``--token-file`` in ARGS)."""
    return subprocess.run(
        fleet_cmd(api, command, *args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=fleet_env(token if token is not None or api is None else api.operator),
    )


def popen(api: ApiServer, command: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        fleet_cmd(api, command, *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=fleet_env(""),
    )  # fmt: skip


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s")


def only_rollout(database: Database) -> str | None:
    with database.session() as s:
        return s.scalar(select(Rollout.id))


def test_status_through_the_server(api: ApiServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(api.reader + "\n")
    out = run(api, "status", "--token-file", str(token_file), token="")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "DEVICE",
        "ONLINE",
        "STATUS",
        "MODELS",
        "FPS",
        "P95",
        "MS",
        "AGENT",
        "LAST",
        "SEEN",
    ]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["cam-1", "yes", "ok", "digits", "1"],
        ["cam-2", "yes", "ok", "digits", "1"],
        ["cam-3", "no", "offline", "-", "-"],
    ]
    rows = json.loads(run(api, "status", "--group", "door", "--json").stdout)["devices"]
    assert [(r["id"], r["fps"]) for r in rows] == [("cam-1", 10.5), ("cam-2", 11.5)]
    one = json.loads(run(api, "status", "--device", "cam-3", "--json").stdout)["devices"]
    assert [(r["id"], r["status"], r["models"]) for r in one] == [("cam-3", "offline", {})]
    by_env = subprocess.run(
        [sys.executable, "-m", "fleet", "status", "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**fleet_env(api.reader), "EDGE_FLEET_SERVER": api.url},
    )  # fmt: skip
    assert len(json.loads(by_env.stdout)["devices"]) == 3, by_env.stderr
    refused = run(api, "status", token="eft_wrong")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "edge-fleet status: GET /api/devices: HTTP 401 Unauthorized: unknown or revoked token"
    )


def test_server_errors_and_usage(api: ApiServer) -> None:
    for command in (["rollouts"], ["history", "cam-1"]):
        out = run(None, *command)
        assert out.returncode == 2
        assert f"{command[0]} needs --server URL (or env EDGE_FLEET_SERVER)" in out.stderr
    nobody = subprocess.run(
        [sys.executable, "-m", "fleet", "status", "--server", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=fleet_env("x"),
    )  # fmt: skip
    assert nobody.returncode == 1 and "connection refused" in nobody.stderr
    assert len(nobody.stderr.strip().splitlines()) == 1
    out = run(api, "history", "cam-9")
    assert out.returncode == 2 and "HTTP 404 Not Found: unknown device 'cam-9'" in out.stderr


def test_deploy_no_follow_leaves_the_rollout_to_the_server(api: ApiServer, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    args = ["--group", "door", "--pub", str(api.keys.public), "--canary", "1", "--no-follow"]
    out = run(api, "deploy", str(bundle), *args)
    assert out.returncode == 0, out.stderr
    with api.database.session() as s:
        (rollout,) = s.scalars(select(Rollout)).all()
        assert (rollout.model, rollout.version, rollout.target) == ("digits", "2", "door")
        assert rollout.plan["canary"] == "1" and rollout.created_by == "ops"
        (record,) = s.scalars(select(BundleRecord)).all()
        assert record.version == "2"
    assert f"rollouts --server {api.url} --id {rollout.id}" in out.stdout
    # Uploading the same bundle again is no error (idempotent).
    again = run(api, "deploy", str(bundle), *args)
    assert again.returncode == 0, again.stderr
    listed = run(api, "rollouts")
    assert listed.returncode == 0 and rollout.id in listed.stdout
    # Checked locally before anything is sent: a bundle that does not verify.
    tampered = make_bundle(tmp_path / "digits-3", MODEL, version="3", keys=api.keys)
    (tampered / "model.tflite").write_bytes(MODEL[:-1] + b"\0")
    bad = run(api, "deploy", str(tampered), *args)
    assert bad.returncode == 2 and "refusing" in bad.stderr
    usage = run(None, "deploy", str(bundle), "--group", "door", "--no-follow", "--allow-unsigned")
    assert usage.returncode == 2 and "go with --server" in usage.stderr


def test_deploy_passes_shadow_and_min_agreement_to_the_rollout(
    api: ApiServer, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    args = ["--pub", str(api.keys.public), "--no-follow"]
    checked = ["--group", "door", "--no-shadow", "--min-agreement", "0.9"]
    out = run(api, "deploy", str(bundle), *checked, *args)
    assert out.returncode == 0, out.stderr
    out = run(api, "deploy", str(bundle), "--device", "cam-3", *args)
    assert out.returncode == 0, out.stderr
    with api.database.session() as s:
        rows = {r.target: (r.id, r.shadow, r.min_agreement) for r in s.scalars(select(Rollout))}
    assert {t: v[1:] for t, v in rows.items()} == {"door": (False, 0.9), "cam-3": (None, None)}
    shown = run(api, "rollouts", "--id", rows["door"][0])
    assert shown.returncode == 0 and "shadow off, min agreement 0.9)" in shown.stdout
    shown = run(api, "rollouts", "--id", rows["cam-3"][0])
    assert shown.returncode == 0 and "shadow" not in shown.stdout.splitlines()[0]


def follow(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The deploy's first two lines: the rollout made, then the first poll's state.
    Read before the test moves the rollout, so the CLI has seen it running."""
    assert proc.stdout is not None
    return proc.stdout.readline(), proc.stdout.readline()


def finish(proc: subprocess.Popen[str], read: str) -> tuple[str, str]:
    """The rest of the output; not communicate(): it reads the pipe's fd and would
    lose what readline buffered."""
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = read + proc.stdout.read(), proc.stderr.read()
    proc.wait(60)
    return stdout, stderr


def test_deploy_follows_the_canary_and_the_halt(
    api: ApiServer, reconcile: Reconciler, sender: FakeSender, token_file: str, tmp_path: Path
) -> None:
    """The README's ``deploy --canary 1``: the canary fails, the server halts the rollout
    before the rest; the CLI shows the failure and the device left out, and exits 3."""
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    proc = popen(
        api, "deploy", str(bundle), "--token-file", token_file, "--group", "door",
        "--canary", "1", "--pub", str(api.keys.public),
    )  # fmt: skip
    try:
        created, following = follow(proc)
        rid = created.split()[1].rstrip(":")
        assert (
            created.startswith(f"rollout {rid}: digits 2 (sha256 ") and "to 2 device(s)" in created
        )
        assert following == f"rollout {rid} running\n", (created, following)
        reconcile.tick()
        [(canary, command)] = sender.take()
        assert canary == "cam-1"
        reply(api.database, command.id, "failed", "validation_failed", "NaN outputs")
        reconcile.tick()  # its one try failed: given up, beyond max_failures 0
        assert state_of(api.database, rid) == "halted"
        stdout, stderr = finish(proc, created + following)
    finally:
        proc.kill()
    assert proc.returncode == 3, (stdout, stderr)
    assert f"rollout {rid} halted: halted: 1 device(s) failed" in stdout
    assert "cam-1                failed [validation_failed]  (NaN outputs)" in stdout
    assert "cam-2                skipped  (not sent: the rollout halted)" in stdout
    assert (
        "deploy digits 2: HALTED, 0/2 done; failed: cam-1 (validation_failed: NaN outputs); "
        "halted before 1 device(s): cam-2"
    ) in stdout
    assert statuses(api.database, rid) == {"cam-1": "given_up", "cam-2": "waiting"}


def test_deploy_follows_the_rollout_to_its_end(
    api: ApiServer, reconcile: Reconciler, sender: FakeSender, tmp_path: Path
) -> None:
    """One device done, one given up within --max-failures: the rollout ends done, the
    CLI shows both and exits 4."""
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    proc = subprocess.Popen(
        fleet_cmd(api, "deploy", str(bundle), "--group", "door", "--max-failures", "1",
                  "--pub", str(api.keys.public)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=fleet_env(api.operator),
    )  # fmt: skip
    try:
        created, following = follow(proc)
        rid = created.split()[1].rstrip(":")
        assert following == f"rollout {rid} running\n", (created, following)
        reconcile.tick()
        sent = dict(sender.take())
        assert sorted(sent) == ["cam-1", "cam-2"]
        reply(api.database, sent["cam-1"].id, "progress")
        reconcile.tick()
        assert statuses(api.database, rid)["cam-1"] == "progress"
        complete(api.database, "cam-1", sent["cam-1"])
        reply(api.database, sent["cam-2"].id, "failed", "download_failed", "model file unreachable")
        reconcile.tick()
        assert state_of(api.database, rid) == "done"
        stdout, stderr = finish(proc, created + following)
    finally:
        proc.kill()
    assert proc.returncode == 4, (stdout, stderr)
    assert "cam-1                done" in stdout
    assert "cam-2                failed [download_failed]  (model file unreachable)" in stdout
    assert "deploy digits 2: FAILED, 1/2 done; failed: cam-2 (download_failed" in stdout


def test_deploy_ends_when_the_rollout_is_done_with_devices_offline(
    api: ApiServer, reconcile: Reconciler, sender: FakeSender, tmp_path: Path
) -> None:
    """cam-2 stays pending (offline): the CLI returns 5 and says the server goes on."""
    with api.database.session() as s:
        cam2 = s.get(Device, "cam-2")
        assert cam2 is not None
        cam2.online, cam2.status = False, "offline"
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    proc = subprocess.Popen(
        fleet_cmd(api, "deploy", str(bundle), "--group", "door", "--pub", str(api.keys.public),
                  "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=fleet_env(api.operator),
    )  # fmt: skip
    try:
        rid = wait_for("rollout", lambda: only_rollout(api.database))
        reconcile.tick()
        [(device, command)] = sender.take()  # the online one only
        assert device == "cam-1"
        complete(api.database, device, command)
        reconcile.tick()
        assert state_of(api.database, rid) == "done"
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 5, (stdout, stderr)
    report = json.loads(stdout)
    assert report["rollout"] == rid and report["state"] == "done"
    assert [(d["device"], d["status"], d["online"]) for d in report["devices"]] == [
        ("cam-1", "done", True),
        ("cam-2", "pending", False),
    ]
    assert report["devices"][1]["message"] == "offline: the server sends it when the device returns"
    assert report["result"] == "timeout" and report["pending"] == ["cam-2"]


def test_rollouts_history_and_rollback(
    api: ApiServer, reconcile: Reconciler, sender: FakeSender, token_file: str, tmp_path: Path
) -> None:
    with api.database.session() as s:  # as ingest records a device's version
        s.add(VersionHistory(device_id="cam-1", model="digits", version="1", started=5.0))
    client = ServerClient(api.url, api.operator)
    client.upload_bundle(make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys))
    rid = client.create_rollout({"model": "digits", "version": "2", "group": "door"})["id"]
    reconcile.tick()
    sent = dict(sender.take())
    assert sorted(sent) == ["cam-1", "cam-2"]
    reply(api.database, sent["cam-1"].id, "failed", "busy", "another command runs")
    complete(api.database, "cam-2", sent["cam-2"])
    reconcile.tick()
    assert state_of(api.database, rid) == "halted"

    tf = ["--token-file", token_file]
    one = run(api, "rollouts", *tf, "--id", rid, token="")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(f"rollout {rid}: digits 2 to group/door, halted")
    assert "cam-1   1     given_up" in one.stdout and "cam-2   1     done" in one.stdout
    listed = run(api, "rollouts", *tf, token="")
    assert listed.returncode == 0, listed.stderr
    assert rid in listed.stdout and "halted" in listed.stdout
    as_json = json.loads(run(api, "rollouts", *tf, "--json", token="").stdout)
    assert [r["id"] for r in as_json["rollouts"]] == [rid]

    def rollback(*target: str) -> list[str]:
        """Run ``rollback``, answer its commands as the devices would; the devices sent to."""
        before = len(api.sender.sent)
        proc = popen(api, "rollback", *tf, *target, "--to", "1")
        try:
            n = 1 if "--device" in target else 2
            wait_for(f"{n} command(s)", lambda: len(api.sender.sent) == before + n)
            for _device, command in api.sender.sent[before:]:
                assert command.op == "rollback" and command.to_version == "1"
                reply(api.database, command.id, "done")
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, (stdout, stderr)
        assert f"rollback: all {n} device(s) done" in stdout
        return [device for device, _ in api.sender.sent[before:]]

    assert rollback("--device", "cam-1") == ["cam-1"]
    assert sorted(rollback("--group", "door")) == ["cam-1", "cam-2"]

    history = subprocess.run(
        [sys.executable, "-m", "fleet", "history", "cam-1", "--server", api.url, *tf],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=fleet_env(""),
    )  # fmt: skip
    assert history.returncode == 0, history.stderr
    assert "versions:\nMODEL   VERSION  FROM" in history.stdout
    assert "rollback  " in history.stdout and "events: none" in history.stdout
    data = json.loads(run(api, "history", "cam-1", "--json").stdout)
    assert [c["op"] for c in data["commands"]] == ["rollback", "rollback", "deploy"]
    assert data["commands"][2]["rollout_id"] == rid


def test_rollouts_approve_pause_resume_abort(
    api: ApiServer, reconcile: Reconciler, sender: FakeSender, token_file: str, tmp_path: Path
) -> None:
    """A rollout in three waves with approval, driven by ``rollouts --id R --approve |
    --pause | --resume | --abort``; a transition that makes no sense is refused (409,
    exit 2) with the server's reason in one line."""
    add_device(api.database, "cam-4", groups=("door",), models={"digits": "1"})
    client = ServerClient(api.url, api.operator)
    v1 = make_bundle(tmp_path / "digits-1", MODEL[::-1], version="1", keys=api.keys)
    client.upload_bundle(v1)
    first = client.create_rollout({"model": "digits", "version": "1", "group": "door"})["id"]
    reconcile.tick()
    assert state_of(api.database, first) == "done" and sender.take() == []  # already there

    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    deployed = run(
        api, "deploy", str(bundle), "--token-file", token_file, "--group", "door",
        "--waves", "3", "--approval", "--no-follow", "--pub", str(api.keys.public), token="",
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    rid = deployed.stdout.split()[1].rstrip(":")
    view = client.rollout(rid)
    assert view["plan"]["approval"] is True
    assert [d["device"] for d in view["devices"]] == ["cam-1", "cam-2", "cam-4"]
    assert [d["wave"] for d in view["devices"]] == [0, 1, 2]

    def rollouts(*args: str) -> subprocess.CompletedProcess[str]:
        return run(api, "rollouts", "--token-file", token_file, *args, token="")

    def refused(action: str, why: str) -> None:
        out = rollouts("--id", rid, f"--{action}")
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr.splitlines() == [
            f"edge-fleet rollouts: POST /api/rollouts/{rid}/{action}: HTTP 409 Conflict: "
            f"state: cannot {action} rollout {rid}: {why}"
        ]

    def done(action: str, head: str) -> None:
        out = rollouts("--id", rid, f"--{action}")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"rollout {rid}: digits 2 to group/door, {head}"), out.stdout

    refused("approve", "it is running, not waiting_approval")
    refused("resume", "it is running, not paused or halted")
    reconcile.tick()
    [(device, command)] = sender.take()
    assert device == "cam-1"
    complete(api.database, device, command)
    reconcile.tick()
    assert state_of(api.database, rid) == "waiting_approval"
    reconcile.tick()
    assert sender.take() == []  # wave 1 waits for the operator

    done("approve", "running (wave 2 of 3;")
    done("pause", "paused (wave 2 of 3;")
    reconcile.tick()
    assert sender.take() == []  # paused: nothing is sent
    assert statuses(api.database, rid)["cam-2"] == "pending"
    done("resume", "running (wave 2 of 3;")
    reconcile.tick()
    [(device, command)] = sender.take()
    assert device == "cam-2"

    done("abort", "aborted")
    desired = api.request("GET", "/api/desired", token=api.reader).json()["desired"]
    assert [(d["target"], d["model"], d["version"], d["rollout_id"]) for d in desired] == [
        ("door", "digits", "1", first)
    ]
    assert state_of(api.database, first) == "done"  # the replaced rollout takes over again
    refused("abort", "it is aborted, not running, waiting, paused, halted or done")

    usage = rollouts("--pause")
    assert usage.returncode == 2 and "--pause needs --id ROLLOUT" in usage.stderr
    unknown = rollouts("--id", "r-000000000000", "--approve")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("HTTP 404 Not Found: no rollout 'r-000000000000'")


def test_interrupting_deploy_leaves_the_rollout_running(api: ApiServer, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "digits-2", MODEL, version="2", keys=api.keys)
    proc = subprocess.Popen(
        fleet_cmd(api, "deploy", str(bundle), "--group", "door", "--pub", str(api.keys.public)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=fleet_env(api.operator),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "rollout r-...: digits 2 ... to 2 device(s), running"
        assert first.startswith("rollout r-"), first
        proc.send_signal(signal.SIGINT)
        # Not communicate(): it reads the pipe's fd and would lose what readline buffered.
        stdout = proc.stdout.read()
        proc.wait(60)
    finally:
        proc.kill()
    rid = first.split()[1].rstrip(":")
    assert proc.returncode == 130, stdout
    hint = f"edge-fleet rollouts --server {api.url} --id {rid}"
    assert f"stopped following; the rollout goes on on the server: {hint}" in stdout
    with api.database.session() as s:
        rollout = s.get(Rollout, rid)
        assert rollout is not None and rollout.state == "running"
