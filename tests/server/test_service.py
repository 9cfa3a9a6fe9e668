"""The server as a service: its unit passes systemd's checks, its example config loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.server.config import ConfigError, ServerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd/edge-fleet-server.service"
EXAMPLE = ROOT / "configs/fleet-server.example.yaml"
ANALYZE = shutil.which("systemd-analyze")


def unit_copy(tmp_path: Path) -> Path:
    text = UNIT.read_text().replace("/opt/edge-fleet/venv/bin/edge-fleet", sys.executable)
    copy = tmp_path / "edge-fleet-server.service"
    copy.write_text(text)
    return copy


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ANALYZE), "verify", str(unit_copy(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "edge-fleet-server.service" not in result.stderr, result.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    line = next(ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln)
    assert float(line.split(":")[1].split()[0]) <= 2.5, line


def test_the_example_config_is_valid_and_names_every_key() -> None:
    config = load_config(EXAMPLE)
    assert config.trusted_keys == [Path("/etc/edge-fleet/keys/signing.pub")]
    # Every key of the schema appears in the example (it documents them all).
    example = yaml.safe_load(EXAMPLE.read_text())

    def keys(model: type, data: dict, path: str = "") -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            assert name in data, f"{path}{name} missing from the example"
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, ServerConfig.__mro__[1]):
                keys(sub, data[name], f"{path}{name}.")

    keys(ServerConfig, example)


def test_a_bad_key_is_named_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("reconcile:\n  max_atempts: 3\nhttp:\n  max_upload_mb: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "reconcile.max_atempts" in str(err.value)
    assert "http.max_upload_mb" in str(err.value)
