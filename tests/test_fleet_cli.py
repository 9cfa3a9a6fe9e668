"""edge-fleet end to end: the CLI in a subprocess, simulated devices, a real Mosquitto."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.models.manifest import load_public_key
from agent.protocol import DeployCommand, ModelState, ReplyCode
from fleet.cli import UsageError, build_parser, load_bundle
from tests.fleet_support import (
    Keys,
    SimDevice,
    json_out,
    make_bundle,
    make_keys,
    run_fleet,
    start_fleet,
)
from tests.mqtt_support import Broker

MODEL = bytes(range(256)) * 700  # 175 KiB: several 64 KiB chunks, several HTTP blocks


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "digits-2", MODEL, version="2", keys=keys)


class Fleet:
    """Simulated devices for one test, stopped at the end."""

    def __init__(self, broker: Broker, prefix: str, keys: Keys) -> None:
        self.broker, self.prefix, self.keys = broker, prefix, keys
        self.devices: list[SimDevice] = []

    def add(self, device: str, *, start: bool = True, **kw: object) -> SimDevice:
        sim = SimDevice(
            self.broker,
            device,
            prefix=self.prefix,
            trusted_keys=[load_public_key(self.keys.public)],
            **kw,  # type: ignore[arg-type]
        )
        self.devices.append(sim)
        return sim.start() if start else sim

    def assert_honest(self) -> None:
        for sim in self.devices:
            assert sim.invalid == [], (sim.device, sim.invalid)


@pytest.fixture
def fleet(broker: Broker, prefix: str, keys: Keys) -> Iterator[Fleet]:
    f = Fleet(broker, prefix, keys)
    yield f
    for sim in f.devices:
        sim.stop()
    f.assert_honest()


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ------------------------------------------------------------------------- status


def test_status_shows_retained_states_and_telemetry(
    fleet: Fleet, broker: Broker, prefix: str
) -> None:
    fleet.add("pi-a", groups=["kitchen"])
    fleet.add("pi-b", groups=["garage"])
    gone = fleet.add("pi-c", groups=["kitchen"])
    gone.stop()

    proc = run_fleet(broker, prefix, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["device"]: r for r in json_out(proc)["devices"]}
    assert set(rows) == {"pi-a", "pi-b", "pi-c"}
    a = rows["pi-a"]
    assert a["online"] is True
    assert a["models"] == [
        {
            "name": "digits",
            "active": "1",
            "status": "serving",
            "last_known_good": None,
            "versions": ["1"],
        }
    ]
    assert (a["fps"], a["invoke_ms_p95"], a["temperature_c"], a["outbox_depth"]) == (
        14.5,
        4.25,
        47.5,
        3,
    )
    assert a["groups"] == ["kitchen"] and a["last_seen"] > time.time() - 30
    assert rows["pi-c"]["online"] is False

    proc = run_fleet(broker, prefix, "status", "--group", "kitchen")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "ONLINE", "MODELS"]
    assert [line.split()[:2] for line in lines[1:]] == [["pi-a", "yes"], ["pi-c", "no"]]
    assert "digits 1 (serving)" in lines[1] and "14.5" in lines[1] and "47.5" in lines[1]


def test_status_shows_output_drift(fleet: Fleet, broker: Broker, prefix: str) -> None:
    warning = (
        "output drift PSI 0.412 over 0.25 (top-1 classes, confidence) since 2026-01-01T00:00:00Z"
    )
    fleet.add("pi-a", drift=0.412, drift_warning=warning)
    fleet.add("pi-b", drift=0.031)
    fleet.add("pi-c")  # no reference statistics: no figure

    proc = run_fleet(broker, prefix, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["device"]: r for r in json_out(proc)["devices"]}
    assert (rows["pi-a"]["drift"], rows["pi-a"]["drift_warnings"]) == (0.412, {"cam": warning})
    assert (rows["pi-b"]["drift"], rows["pi-b"]["drift_warnings"]) == (0.031, {})
    assert (rows["pi-c"]["drift"], rows["pi-c"]["drift_warnings"]) == (None, {})

    proc = run_fleet(broker, prefix, "status")
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    drift_at = header.index("DRIFT")
    assert header.split()[:7] == ["DEVICE", "ONLINE", "MODELS", "FPS", "P95", "MS", "DRIFT"]
    column = {line.split()[0]: line[drift_at:].split("  ")[0].strip() for line in lines}
    assert column == {"pi-a": "0.41 warn", "pi-b": "0.03", "pi-c": "-"}


# ------------------------------------------------------------------------- deploy


@pytest.mark.parametrize("via", ["http", "mqtt"])
def test_deploy_to_two_devices(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path, via: str
) -> None:
    a, b = fleet.add("pi-a"), fleet.add("pi-b")
    proc = run_fleet(
        broker,
        prefix,
        "deploy",
        str(bundle_v2),
        "--device",
        "pi-a",
        "pi-b",
        "--pub",
        str(keys.public),
        "--via",
        via,
        "--timeout",
        "30",
        "--json",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json_out(proc)
    assert out["result"] == "ok" and out["version"] == "2" and out["via"] == via
    assert out["artifact"]["kind"] == {"http": "url", "mqtt": "mqtt"}[via]
    assert {d["device"]: d["status"] for d in out["devices"]} == {"pi-a": "done", "pi-b": "done"}
    assert a.active() == "2" and b.active() == "2"
    for sim in (a, b):
        (cmd,) = [c for c in sim.received if isinstance(c, DeployCommand)]
        assert cmd.expires_at is not None and cmd.expires_at > time.time() + 3000
        assert cmd.signature is not None and cmd.manifest["version"] == "2"
    if via == "mqtt":
        assert out["artifact"]["chunks"] == 3 and out["artifact"]["chunk_size"] == 64 * 1024


def test_lost_chunks_are_asked_for_again_and_sent_again(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    lossy = fleet.add("pi-lossy", lose_chunks=2, chunk_wait_s=0.5)
    proc = run_fleet(
        broker, prefix, "deploy", str(bundle_v2), "--device", "pi-lossy",
        "--pub", str(keys.public), "--via", "mqtt", "--timeout", "30", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lossy.active() == "2"
    assert lossy.chunk_requests_again >= 1


def test_deploy_by_file_url_without_a_server(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    sim = fleet.add("pi-a")
    url = (bundle_v2 / "model.tflite").resolve().as_uri()
    proc = run_fleet(
        broker, prefix, "deploy", str(bundle_v2), "--device", "pi-a",
        "--pub", str(keys.public), "--url", url, "--timeout", "30", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json_out(proc)["artifact"] == {"kind": "url", "url": url}
    assert sim.active() == "2"
    bad = run_fleet(
        broker, prefix, "deploy", str(bundle_v2), "--device", "pi-a",
        "--pub", str(keys.public), "--url", "ftp://example.com/m.tflite",
    )  # fmt: skip
    assert bad.returncode == 2 and "--url" in bad.stderr and bad.stderr.count("\n") == 1


def test_canary_rollout_halts_when_the_canary_rejects_the_model(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    bad = fleet.add(
        "k-1",
        groups=["kitchen"],
        reject={"2": (ReplyCode.VALIDATION_FAILED, "outputs are all NaN")},
    )
    rest = [fleet.add(f"k-{i}", groups=["kitchen"]) for i in (2, 3, 4)]
    proc = run_fleet(
        broker,
        prefix,
        "deploy",
        str(bundle_v2),
        "--group",
        "kitchen",
        "--canary",
        "1",
        "--pub",
        str(keys.public),
        "--timeout",
        "30",
        "--json",
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    out = json_out(proc)
    assert out["result"] == "halted" and out["halted"] is True
    assert out["failed"] == ["k-1"]
    assert out["skipped"] == ["k-2", "k-3", "k-4"]
    (failed,) = [d for d in out["devices"] if d["device"] == "k-1"]
    assert failed["code"] == "validation_failed"
    assert failed["message"] == "outputs are all NaN"
    assert bad.active() == "1"
    for sim in rest:  # the rollout stopped before the rest: they never got a command
        assert sim.received == [] and sim.active() == "1"


def test_canary_within_max_failures_goes_on_and_exit_code_says_failed(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    fleet.add("k-1", groups=["g"], reject={"2": (ReplyCode.PROBATION_FAILED, "p95 doubled")})
    others = [fleet.add(f"k-{i}", groups=["g"]) for i in (2, 3, 4)]
    proc = run_fleet(
        broker,
        prefix,
        "deploy",
        str(bundle_v2),
        "--group",
        "g",
        "--canary",
        "50%",
        "--max-failures",
        "1",
        "--pub",
        str(keys.public),
        "--timeout",
        "30",
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "k-1" in proc.stdout and "probation_failed" in proc.stdout
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("deploy digits 2: FAILED, 3/4 done; failed: k-1 (probation_failed")
    assert all(sim.active() == "2" for sim in others)


def test_offline_device_is_pending_and_completed_when_it_comes_back(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    a = fleet.add("pi-a")
    away = fleet.add("pi-away")
    away.stop()  # a persistent session at the broker, retained state offline
    proc = start_fleet(
        broker,
        prefix,
        "deploy",
        str(bundle_v2),
        "--device",
        "pi-a",
        "pi-away",
        "--pub",
        str(keys.public),
        "--timeout",
        "30",
    )
    try:
        wait_until(lambda: a.active() == "2", 15)
        assert away.received == []
        away.start()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert any(line.split()[:2] == ["pi-away", "pending"] for line in stdout.splitlines()), stdout
    assert stdout.strip().endswith("all 2 device(s) done")
    assert away.active() == "2"
    assert len({c.id for c in away.received}) == 1  # sent again on return, executed once
    assert len(away.executed) == 1


def test_offline_device_still_pending_at_the_timeout(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path
) -> None:
    fleet.add("pi-away").stop()
    proc = run_fleet(
        broker,
        prefix,
        "deploy",
        str(bundle_v2),
        "--device",
        "pi-away",
        "--pub",
        str(keys.public),
        "--timeout",
        "1",
        "--json",
    )
    assert proc.returncode == 5, proc.stdout + proc.stderr
    out = json_out(proc)
    assert out["result"] == "timeout" and out["pending"] == ["pi-away"]


def test_unsigned_or_tampered_bundle_is_refused(
    fleet: Fleet, broker: Broker, prefix: str, keys: Keys, bundle_v2: Path, tmp_path: Path
) -> None:
    sim = fleet.add("pi-a")
    unsigned = make_bundle(tmp_path / "unsigned", MODEL, version="3", keys=None)
    tampered = make_bundle(tmp_path / "tampered", MODEL, version="3", keys=keys)
    (tampered / "model.tflite").write_bytes(MODEL[:-1] + b"\x00")
    forged = make_bundle(tmp_path / "forged", MODEL, version="3", keys=keys)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["version"] = "4"
    (forged / "manifest.json").write_text(json.dumps(manifest))
    cases = {
        unsigned: "not signed",
        tampered: "does not match manifest",
        forged: "does not verify",
    }
    for bundle, reason in cases.items():
        proc = run_fleet(
            broker, prefix, "deploy", str(bundle), "--device", "pi-a", "--pub", str(keys.public)
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout == ""
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("edge-fleet deploy: refusing ") and reason in line
    proc = run_fleet(broker, prefix, "deploy", str(bundle_v2), "--device", "pi-a")
    assert proc.returncode == 2 and "--pub KEY" in proc.stderr
    assert sim.received == []


# -------------------------------------------------------------- rollback, ping, watch


def test_rollback_to_previous_and_named_version(fleet: Fleet, broker: Broker, prefix: str) -> None:
    history = ModelState(
        name="digits", active="3", last_known_good="2", status="serving", versions=["1", "2", "3"]
    )
    a = fleet.add("pi-a", groups=["lab"], model_states=[history])
    b = fleet.add("pi-b", groups=["lab"], model_states=[history])
    proc = run_fleet(broker, prefix, "rollback", "--group", "lab", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json_out(proc)
    assert out["model"] == "digits" and out["result"] == "ok"
    assert a.active() == "2" and b.active() == "2"

    proc = run_fleet(broker, prefix, "rollback", "--device", "pi-a", "--to", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert a.active() == "1" and b.active() == "2"
    proc = run_fleet(broker, prefix, "rollback", "--device", "pi-b", "--to", "9", "--json")
    assert proc.returncode == 4
    assert json_out(proc)["devices"][0]["code"] == "not_found"


def test_ping(fleet: Fleet, broker: Broker, prefix: str) -> None:
    fleet.add("pi-a")
    fleet.add("pi-b")
    proc = run_fleet(broker, prefix, "ping", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json_out(proc)
    assert {d["device"] for d in out["devices"]} == {"pi-a", "pi-b"}
    assert all(d["status"] == "done" and d["seconds"] < 5 for d in out["devices"])

    fleet.add("pi-c").stop()
    proc = run_fleet(broker, prefix, "ping", "--device", "pi-a", "pi-c", "--timeout", "1")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "TIMEOUT, 1/2 done" in proc.stdout


def test_watch_json_streams_states_telemetry_and_results(
    fleet: Fleet, broker: Broker, prefix: str
) -> None:
    fleet.add("pi-a", results=True)
    fleet.add("pi-b")
    proc = run_fleet(
        broker,
        prefix,
        "watch",
        "--device",
        "pi-a",
        "--telemetry",
        "--results",
        "--json",
        "--count",
        "6",
        "--duration",
        "20",
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) == 6
    assert {e["device"] for e in events} == {"pi-a"}
    kinds = {e["kind"] for e in events}
    assert {"state", "telemetry", "result"} <= kinds
    first_state = next(e for e in events if e["kind"] == "state")
    assert first_state["message"]["online"] is True


# ----------------------------------------------------------------- docs and parsing


def test_readme_fleet_commands_parse() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Fleet console", 1)[1].split("\n## ", 1)[0]
    commands = [
        line.split("#", 1)[0].split()
        for line in section.splitlines()
        if line.startswith("edge-fleet ")
    ]
    assert {c[1] for c in commands} == {"status", "deploy", "rollback", "ping", "watch", "captures"}
    parser = build_parser()
    for command in commands:
        parser.parse_args(command[1:])


def test_allow_unsigned_is_explicit(tmp_path: Path, keys: Keys) -> None:
    unsigned = make_bundle(tmp_path / "u", MODEL, version="5", keys=None)
    parser = build_parser()
    args = parser.parse_args(["deploy", str(unsigned), "--device", "a", "--allow-unsigned"])
    assert load_bundle(args).signature is None
    args = parser.parse_args(["deploy", str(unsigned), "--device", "a", "--pub", str(keys.public)])
    with pytest.raises(UsageError, match="not signed"):
        load_bundle(args)


def test_unreachable_broker_is_one_line_and_exit_1(prefix: str, tmp_path: Path) -> None:
    nowhere = Broker(tmp_path / "never-started")
    proc = run_fleet(nowhere, prefix, "status", "--connect-timeout", "2")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("edge-fleet status: cannot connect to the broker at mqtt://127.0.0.1:")


def test_shadow_options_of_a_deploy(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["deploy", "b", "--device", "a"])
    assert (args.shadow, args.min_agreement) == (None, None)  # the devices' config decides
    args = parser.parse_args(
        ["deploy", "b", "--device", "a", "--no-shadow", "--min-agreement", "0.8"]
    )
    assert (args.shadow, args.min_agreement) == (False, 0.8)
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "b", "--device", "a", "--min-agreement", "1.5"])
    assert "expected a number from 0 to 1, got '1.5'" in capsys.readouterr().err
    assert parser.parse_args(["deploy", "b", "--device", "a", "--shadow"]).shadow is True
