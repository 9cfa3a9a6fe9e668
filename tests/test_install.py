"""systemd/install.sh --root DIR: the tree it produces, idempotence, the operator's config
kept, uninstall (with and without --purge) and the runtime extra it picks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd/install.sh"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CHANGES = ("installed:", "updated:", "created:", "removed:", "enabled:", "mode ")
# The constraints install.sh takes for this interpreter under a --root without /etc.
BY_PYTHON = {10: "jetpack6", 11: "bookworm-tflite", 12: "trixie", 13: "trixie"}
OWN_CONSTRAINTS = ROOT / f"constraints/{BY_PYTHON[sys.version_info[1]]}.txt"


def install(
    root: Path, *args: str, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), "--root", str(root), "--no-venv", "--python", python, *args],
        capture_output=True, text=True, timeout=60, env=ENV,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[str, int, float]]:
    """Every path under root: (content hash or link target, mode, mtime)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        tree[str(path.relative_to(root))] = (what, st.st_mode, st.st_mtime)
    return tree


def changes(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(CHANGES)]


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    result = install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_install_produces_the_expected_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    unit = root / "etc/systemd/system/edge-agent.service"
    assert unit.read_text() == (ROOT / "systemd/edge-agent.service").read_text()
    assert (unit.stat().st_mode & 0o777) == 0o644
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/edge-agent.service"
    config = root / "etc/edge-agent/agent.yaml"
    assert config.read_text() == (ROOT / "configs/agent.example.yaml").read_text()
    assert (config.stat().st_mode & 0o777) == 0o640  # may hold a password
    for d in ("etc/edge-agent", "etc/edge-agent/keys", "var/lib/edge-agent", "var/log/edge-agent"):
        assert ((root / d).stat().st_mode & 0o777) == 0o750, d
    assert (root / "etc/edge-agent/keys/example.pub").is_file()
    assert (root / "opt/edge-agent/constraints.txt").read_text() == OWN_CONSTRAINTS.read_text()
    assert (
        f"constraints: {OWN_CONSTRAINTS} (for Python 3.{sys.version_info[1]} (on an unknown OS))"
        in out
    )
    assert (root / "opt/edge-agent/docs/operations.md").is_file()  # the unit's Documentation=
    # The installed config was checked, and host changes were only printed.
    assert f"{config}: ok (device pi-kitchen-01, 2 pipeline(s))" in out
    assert "would run: useradd --system --user-group" in out
    assert "would run: usermod -aG video edge-agent" in out
    assert "would run: usermod -aG dialout edge-agent" in out
    assert "would run: systemctl daemon-reload" in out
    assert "would run: systemctl restart" not in out  # enabled, not started
    plan = next(line for line in out.splitlines() if line.startswith("skipped (--no-venv)"))
    assert f"-c {root}/opt/edge-agent/constraints.txt '{ROOT}[litert,camera]'" in plan
    assert out.strip().endswith("edge-agent installed")


def test_second_run_changes_nothing_and_keeps_an_edited_config(installed: Path) -> None:
    config = installed / "etc/edge-agent/agent.yaml"
    config.write_text(config.read_text().replace("pi-kitchen-01", "pi-garage-07"))
    before = snapshot(installed)
    result = install(installed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert changes(result.stdout) == []
    assert f"kept: {config}" in result.stdout
    assert "unchanged: edge-agent.service enabled" in result.stdout
    assert "ok (device pi-garage-07" in result.stdout
    assert snapshot(installed) == before


def test_a_changed_unit_is_put_back(installed: Path) -> None:
    unit = installed / "etc/systemd/system/edge-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    result = install(installed)
    assert result.returncode == 0
    assert changes(result.stdout) == [f"updated: {unit}"]
    assert unit.read_text() == (ROOT / "systemd/edge-agent.service").read_text()


def test_an_invalid_operator_config_is_kept_named_and_not_started(installed: Path) -> None:
    config = installed / "etc/edge-agent/agent.yaml"
    config.write_text("device: {id: pi-1}\nmqtt: {prot: 1}\n")
    result = install(installed, "--start")
    assert result.returncode == 1
    assert "mqtt.prot: unknown key" in result.stderr
    assert "does not check clean" in result.stderr
    assert "not started" in result.stdout
    assert "would run: systemctl restart" not in result.stdout
    assert config.read_text() == "device: {id: pi-1}\nmqtt: {prot: 1}\n"


def test_start_restarts_the_service(installed: Path) -> None:
    result = install(installed, "--start")
    assert result.returncode == 0
    assert "would run: systemctl restart edge-agent.service" in result.stdout


def test_uninstall_keeps_config_and_state_and_purge_removes_them(installed: Path) -> None:
    state = installed / "var/lib/edge-agent/models"
    state.mkdir()
    (state / "state.json").write_text("{}")
    result = install(installed, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (installed / "etc/systemd/system/edge-agent.service").exists()
    assert not (
        installed / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    ).exists()
    assert not (installed / "opt/edge-agent").exists()
    assert (installed / "etc/edge-agent/agent.yaml").is_file()
    assert (state / "state.json").is_file()
    assert "userdel" not in result.stdout
    # Uninstalling twice is fine and says nothing changed.
    again = install(installed, "--uninstall")
    assert again.returncode == 0
    assert changes(again.stdout) == []

    purge = install(installed, "--uninstall", "--purge")
    assert purge.returncode == 0, purge.stderr
    for gone in ("etc/edge-agent", "var/lib/edge-agent", "var/log/edge-agent"):
        assert not (installed / gone).exists(), gone
    assert "would run: userdel edge-agent" in purge.stdout


def test_reinstall_after_uninstall_keeps_the_old_config(installed: Path) -> None:
    config = installed / "etc/edge-agent/agent.yaml"
    config.write_text(config.read_text().replace("pi-kitchen-01", "pi-kept-02"))
    assert install(installed, "--uninstall").returncode == 0
    result = install(installed)
    assert result.returncode == 0
    assert "ok (device pi-kept-02" in result.stdout


@pytest.mark.parametrize(
    ("version", "machine", "extras"),
    [
        ("3.11", "aarch64", "litert,camera"),  # Pi OS Bookworm 64-bit
        ("3.10", "aarch64", "litert,camera"),  # Jetson, JetPack 6 (Ubuntu 22.04)
        ("3.12", "x86_64", "litert,camera"),
        ("3.11", "armv7l", "tflite,camera"),  # 32-bit Pi OS
        ("3.13", "aarch64", "litert,camera"),  # Pi OS Trixie
        ("3.14", "aarch64", None),
        ("3.12", "armv7l", None),
        ("3.9", "aarch64", None),
    ],
)
def test_runtime_extra_follows_python_and_machine(
    tmp_path: Path, version: str, machine: str, extras: str | None
) -> None:
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\necho '{version} {machine}'\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [str(INSTALL), "--show-extras", "--python", str(fake)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if extras is None:
        assert result.returncode == 2
        assert f"Python {version}" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == extras


@pytest.mark.parametrize(
    ("os_files", "version", "constraints", "why"),
    [
        (
            {"os-release": 'VERSION_CODENAME="trixie"\n'},
            "3.13",
            "trixie",
            "Debian trixie, Python 3.13",
        ),
        (
            {"os-release": "VERSION_CODENAME=bookworm\n"},
            "3.11",
            "bookworm-tflite",
            "Debian bookworm",
        ),
        (
            {"os-release": "VERSION_CODENAME=jammy\n", "nv_tegra_release": "# R36 (release)\n"},
            "3.10",
            "jetpack6",
            "Jetson, Python 3.10",
        ),
        # The OS's file is not for this Python: the Python decides, and says so.
        (
            {"os-release": "VERSION_CODENAME=bookworm\n"},
            "3.13",
            "trixie",
            "Python 3.13 (on Debian bookworm)",
        ),
        ({"os-release": "VERSION_CODENAME=noble\n"}, "3.12", "trixie", "Python 3.12 (on noble)"),
        ({"os-release": "VERSION_CODENAME=jammy\n"}, "3.10", "jetpack6", "Python 3.10 (on jammy)"),
        ({}, "3.11", "bookworm-tflite", "Python 3.11 (on an unknown OS)"),
    ],
)
def test_constraints_follow_the_os_and_python(
    tmp_path: Path, os_files: dict[str, str], version: str, constraints: str, why: str
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name, text in os_files.items():
        (root / "etc" / name).write_text(text)
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\necho '{version} aarch64'\n")
    fake.chmod(0o755)
    shown = subprocess.run(
        [str(INSTALL), "--root", str(root), "--show-constraints", "--python", str(fake)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"constraints/{constraints}.txt"
    assert why in shown.stdout.splitlines()[1]
    assert (ROOT / "constraints" / f"{constraints}.txt").is_file()
    # The install itself copies that file and says which.
    result = install(root, "--python", str(fake), "--extra", "litert")
    assert f"constraints: {ROOT}/constraints/{constraints}.txt (for " in result.stdout, (
        result.stderr
    )
    installed = root / "opt/edge-agent/constraints.txt"
    assert installed.read_text() == (ROOT / f"constraints/{constraints}.txt").read_text()


def test_constraints_for_an_unsupported_python_are_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho '3.14 aarch64'\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [str(INSTALL), "--root", str(tmp_path), "--show-constraints", "--python", str(fake)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no constraints for Python 3.14" in result.stderr


def test_extra_override_and_wheel_source(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    wheel = tmp_path / "edge_deploy-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = install(root, "--extra", "tflite", "--from", str(wheel))
    assert result.returncode == 0, result.stderr
    assert f"'{wheel}[tflite]'" in result.stdout
    # A wheel brings no constraints file: the repo's is used.
    assert f"constraints: {OWN_CONSTRAINTS} (for " in result.stdout
    assert (root / "opt/edge-agent/constraints.txt").read_text() == OWN_CONSTRAINTS.read_text()


def test_unknown_option_and_missing_source_are_named(tmp_path: Path) -> None:
    result = install(tmp_path, "--frobnicate")
    assert result.returncode == 2
    assert "unknown option --frobnicate" in result.stderr
    result = install(tmp_path, "--from", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "neither a wheel nor a source directory" in result.stderr


def test_a_python_without_venv_is_named_and_a_half_made_venv_made_again(tmp_path: Path) -> None:
    """Debian's python3 without python3-venv: `-m venv` leaves bin/python (without pip) and
    fails. install.sh must say which package to install, and a later run must not take the
    half-made venv for a venv."""
    root = tmp_path / "root"
    root.mkdir()
    log = tmp_path / "python.log"
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$1" in -c) echo "3.11 aarch64"; exit 0 ;; esac\n'
        'for last; do :; done\n'
        'mkdir -p "$last/bin" && printf "#!/bin/sh\\nexit 1\\n" > "$last/bin/python"\n'
        'chmod +x "$last/bin/python"\n'
        'echo "ensurepip is not available"; exit 1\n'
    )  # fmt: skip
    fake.chmod(0o755)
    venv = root / "opt/edge-agent/venv"
    for attempt in (1, 2):
        result = subprocess.run(
            [str(INSTALL), "--root", str(root), "--python", str(fake)],
            capture_output=True, text=True, timeout=60, env=ENV,
        )  # fmt: skip
        assert result.returncode == 2, result.stdout + result.stderr
        assert "apt install python3-venv" in result.stderr
        assert (venv / "bin/python").is_file()  # what the failed -m venv left
        made = [line for line in log.read_text().splitlines() if line.startswith("-m venv")]
        assert made == [f"-m venv --clear {venv}"] * attempt
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
