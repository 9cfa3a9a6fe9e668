"""`edge-agent check CONFIG` (online): real sources, the real store and validation child,
a real private Mosquitto (plain and mutual TLS), and a PASS/FAIL table with remedies."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.models.store import ModelStore
from agent.ops.check import CheckResult, format_table
from tests.lifecycle_support import manifest_for
from tests.link_support import Pki, make_pki
from tests.mqtt_support import Broker, free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DIGITS = {"type": "synthetic", "kind": "digits", "width": 8, "height": 8, "channels": 1}


def write_config(tmp_path: Path, broker_port: int, **over: Any) -> Path:
    config: dict[str, Any] = {
        "device": {"id": "chk-1"},
        "state_dir": str(tmp_path / "state"),
        "models": {"require_signature": False},
        "mqtt": {"host": "127.0.0.1", "port": broker_port},
        "pipelines": [{"name": "main", "model": "digits", "source": DIGITS}],
    }
    config.update(over)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check(path: Path, *extra: str) -> tuple[int, dict[str, str], str]:
    """Exit status, {row name: whole row text incl. remedy}, and the full output."""
    result = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(path), "--timeout", "3", *extra],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    rows: dict[str, str] = {}
    last = ""
    for line in result.stdout.splitlines():
        if line[:4] in ("PASS", "FAIL", "SKIP", "WARN"):
            last = line[6:].split("  ")[0].strip()
            rows[last] = line
        elif line.strip().startswith("remedy:"):
            rows[last] += "\n" + line.strip()
    return result.returncode, rows, result.stdout + result.stderr


def install_model(state_dir: Path, model: Path, *, active: bool = True) -> Path:
    store = ModelStore(state_dir, require_signature=False)
    stored = store.install(manifest_for(model, "digits", "1"), None, model)
    if active:
        store.set_active("digits", "1")
    return stored.model_path


def test_all_pass_with_a_real_broker_source_and_stored_model(
    private_broker: Broker, tmp_path: Path, tiny_int8_model: Path
) -> None:
    path = write_config(tmp_path, private_broker.port)
    install_model(tmp_path / "state", tiny_int8_model)
    code, rows, out = check(path)
    assert code == 0, out
    assert set(rows) == {"config", "runtime", "delegate", "source main", "model digits", "broker"}
    assert all(row.startswith("PASS") for row in rows.values()), out
    assert "synthetic: first frame 8x8x1 uint8" in rows["source main"]
    assert "1 (active) on " in rows["model digits"]
    assert f"127.0.0.1:{private_broker.port}: MQTT 5 CONNACK" in rows["broker"]
    assert out.strip().endswith("6 passed, 0 failed, 0 skipped")


def test_missing_video_file_fails_with_a_remedy_and_nothing_is_created(
    private_broker: Broker, tmp_path: Path
) -> None:
    video = {"type": "video", "path": "clips/door.mp4"}
    path = write_config(
        tmp_path,
        private_broker.port,
        pipelines=[
            {"name": "main", "model": "digits", "source": DIGITS},
            {"name": "door", "model": "digits", "source": video},
        ],
    )
    code, rows, out = check(path)
    assert code == 1, out
    assert rows["source door"].startswith("FAIL"), out
    assert f"video file not found: {tmp_path / 'clips/door.mp4'}" in rows["source door"]
    assert "remedy: make pipelines.door.source.path name a video file" in rows["source door"]
    # The other rows still ran and passed; no stored model is a SKIP, not a failure.
    assert rows["source main"].startswith("PASS")
    assert rows["broker"].startswith("PASS")
    assert rows["model digits"].startswith("SKIP")
    assert not (tmp_path / "state").exists()  # the check changes nothing


def test_broker_port_with_nothing_listening_fails(tmp_path: Path) -> None:
    port = free_port()
    code, rows, out = check(write_config(tmp_path, port))
    assert code == 1, out
    assert rows["broker"].startswith("FAIL")
    assert "Connection refused" in rows["broker"]
    assert f"remedy: nothing listens at 127.0.0.1:{port}" in rows["broker"]
    assert rows["source main"].startswith("PASS")


def test_missing_edgetpu_delegate_fails_naming_the_library(
    private_broker: Broker, tmp_path: Path
) -> None:
    path = write_config(tmp_path, private_broker.port, runtime={"delegate": "edgetpu"})
    code, rows, out = check(path)
    assert code == 1, out
    assert rows["delegate"].startswith("FAIL")
    assert "libedgetpu.so.1" in rows["delegate"]
    assert "apt install libedgetpu1-std" in rows["delegate"]


def test_a_corrupted_stored_model_fails_its_checksum(
    private_broker: Broker, tmp_path: Path, tiny_int8_model: Path
) -> None:
    model_path = install_model(tmp_path / "state", tiny_int8_model)
    model_path.chmod(0o644)
    data = bytearray(model_path.read_bytes())
    data[-1] ^= 0xFF
    model_path.write_bytes(bytes(data))
    code, rows, out = check(write_config(tmp_path, private_broker.port))
    assert code == 1, out
    assert rows["model digits"].startswith("FAIL")
    assert "1 (active)" in rows["model digits"]
    assert "sha256" in rows["model digits"].lower()
    assert "remedy: deploy a good version again" in rows["model digits"]


def test_a_silent_serial_sensor_times_out(private_broker: Broker, tmp_path: Path) -> None:
    controller, device = pty.openpty()
    try:
        sensor = {
            "type": "sensor",
            "input": "serial",
            "port": os.ttyname(device),
            "columns": ["ax"],
            "window": 4,
        }
        path = write_config(
            tmp_path,
            private_broker.port,
            pipelines=[{"name": "vib", "model": "anomaly", "source": sensor, "queue": "fifo"}],
        )
        code, rows, out = check(path)
    finally:
        os.close(controller)
        os.close(device)
    assert code == 1, out
    assert rows["source vib"].startswith("FAIL")
    assert "no frame within 3s" in rows["source vib"]
    assert "dialout" in rows["source vib"]


# ------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, Pki]]:
    pki = make_pki(tmp_path / "pki")
    broker = Broker(
        tmp_path / "mosquitto",
        listener_conf=(
            f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        ),
    )
    broker.start()
    yield broker, pki
    broker.stop()


def tls(ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {"enabled": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}


def test_mutual_tls_passes_with_the_fleet_certificate(
    tls_broker: tuple[Broker, Pki], tmp_path: Path
) -> None:
    broker, pki = tls_broker
    mqtt = {"host": "127.0.0.1", "port": broker.port, "tls": tls(pki.ca_cert, *_client(pki))}
    code, rows, out = check(write_config(tmp_path, broker.port, mqtt=mqtt))
    assert code == 0, out
    assert "with TLS: MQTT 5 CONNACK" in rows["broker"]


def test_mutual_tls_fails_with_a_certificate_the_broker_does_not_trust(
    tls_broker: tuple[Broker, Pki], tmp_path: Path
) -> None:
    broker, pki = tls_broker
    mqtt = {
        "host": "127.0.0.1",
        "port": broker.port,
        "tls": tls(pki.ca_cert, pki.rogue_cert, pki.rogue_key),
    }
    code, rows, out = check(write_config(tmp_path, broker.port, mqtt=mqtt))
    assert code == 1, out
    assert rows["broker"].startswith("FAIL")
    assert "with TLS" in rows["broker"]
    assert "remedy:" in rows["broker"]


def test_plain_client_against_the_tls_port_fails(
    tls_broker: tuple[Broker, Pki], tmp_path: Path
) -> None:
    broker, _ = tls_broker
    code, rows, out = check(write_config(tmp_path, broker.port))
    assert code == 1, out
    assert rows["broker"].startswith("FAIL")


def _client(pki: Pki) -> tuple[Path, Path]:
    return pki.client_cert, pki.client_key


# ----------------------------------------------------------------------- table


def test_table_aligns_rows_and_puts_remedies_under_failures() -> None:
    table = format_table(
        [
            CheckResult("runtime", "PASS", "ai_edge_litert 2.3.0"),
            CheckResult("source door-cam", "FAIL", "camera: cannot open 0", "check /dev/video0"),
            CheckResult("model m", "SKIP", "no version stored yet"),
        ]
    )
    assert table.splitlines() == [
        "PASS  runtime          ai_edge_litert 2.3.0",
        "FAIL  source door-cam  camera: cannot open 0",
        "                       remedy: check /dev/video0",
        "SKIP  model m          no version stored yet",
        "1 passed, 1 failed, 1 skipped",
    ]


def test_invalid_config_exits_2_before_any_check(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"device": {"id": "x"}, "mqtt": {"prot": 1}}))
    result = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(path)],
        capture_output=True, text=True, timeout=60, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2
    assert "mqtt.prot: unknown key" in result.stderr


def stale_override(tmp_path: Path) -> None:
    """An override saved for a pipeline the file has since renamed (``main`` is now)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "config-overrides.json").write_text('{"pipelines.front.threshold": 0.5}')


STALE_WARNING = "saved override pipelines.front.threshold dropped: no pipeline named 'front'"


def test_offline_check_warns_of_an_override_run_would_drop(tmp_path: Path) -> None:
    """`check` loads as `run` does: before, it said ok and `run` exited 2."""
    path = write_config(tmp_path, free_port())
    stale_override(tmp_path)
    status, _rows, output = check(path, "--offline")
    assert status == 0, output
    assert f"warning: {STALE_WARNING}" in output and ": ok (device chk-1" in output
    # A check changes nothing: the running agent is the one that rewrites the file.
    assert "front" in (tmp_path / "state" / "config-overrides.json").read_text()


def test_online_check_has_a_warn_row_that_does_not_fail(
    private_broker: Broker, tmp_path: Path
) -> None:
    path = write_config(tmp_path, private_broker.port)
    stale_override(tmp_path)
    status, _rows, output = check(path)
    assert status == 0, output
    warn_rows = [line.split(None, 2) for line in output.splitlines() if line.startswith("WARN")]
    assert warn_rows == [["WARN", "config", STALE_WARNING]], output
    assert output.splitlines()[-1].endswith(", 1 warned")


def test_table_counts_warnings_apart() -> None:
    table = format_table(
        [CheckResult("config", "PASS", "ok"), CheckResult("config", "WARN", "dropped", "fix it")]
    )
    assert table.splitlines() == [
        "PASS  config  ok",
        "WARN  config  dropped",
        "              remedy: fix it",
        "1 passed, 0 failed, 0 skipped, 1 warned",
    ]


# ------------------------------------------------------------------- result sizes


def install_raw_model(state_dir: Path, model: Path) -> None:
    """The tiny classifier stored as a ``raw`` model: one int8 output of 10 values."""
    store = ModelStore(state_dir, require_signature=False)
    manifest = {**manifest_for(model, "digits", "1"), "task": "raw", "labels": None}
    store.install(manifest, None, model)
    store.set_active("digits", "1")


def test_a_raw_output_over_max_values_is_a_warning_naming_output_size_and_cap(
    private_broker: Broker, tmp_path: Path, tiny_int8_model: Path
) -> None:
    pipeline = {"name": "main", "model": "digits", "source": DIGITS, "raw": {"max_values": 4}}
    path = write_config(tmp_path, private_broker.port, pipelines=[pipeline])
    install_raw_model(tmp_path / "state", tiny_int8_model)
    status, rows, output = check(path)
    assert status == 0, output
    row = rows["results main"]
    assert row.startswith("WARN") and "digits 1: raw output 'StatefulPartitionedCall" in row
    assert "has 10 values per frame, over raw.max_values 4" in row
    assert "remedy: raise pipelines[main].raw.max_values" in row
    assert all(r.startswith("PASS") for name, r in rows.items() if name != "results main")


def test_results_within_bounds_warn_of_nothing(tiny_int8_model: Path) -> None:
    from agent.config import PipelineConfig
    from agent.models.manifest import parse_manifest
    from agent.ops.result_size import result_size_warning

    base = manifest_for(tiny_int8_model, "digits", "1")
    raw = parse_manifest({**base, "task": "raw", "labels": None})
    classify = parse_manifest({**base, "labels": [f"class-{i:02d}" for i in range(10)]})

    def pipeline(**over: Any) -> PipelineConfig:
        return PipelineConfig.model_validate(
            {"name": "p", "model": "digits", "source": DIGITS, **over}
        )

    assert result_size_warning(pipeline(), raw) is None  # 10 values, cap 64
    assert result_size_warning(pipeline(raw={"max_values": 10}), raw) is None
    assert result_size_warning(pipeline(top_k=10), classify) is None  # 10 classes: ~0.7 KB
    big = parse_manifest(
        {
            **base,
            "outputs": [{**base["outputs"][0], "shape": [1, 1000]}],
            "labels": [f"a rather long label number {i}" for i in range(1000)],
        }
    )
    warning = result_size_warning(pipeline(top_k=100), big)
    assert warning is not None and "results may reach about" in warning
    assert "KB (top_k classes), over 2 KB per result" in warning
