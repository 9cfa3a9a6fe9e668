"""The cheap parts of `make install-check` (tests/device/install_check.py): its skip path, the
systemctl stub it puts in the chroot, the pip plan it reads from install.sh and its snapshot.
The check itself is slow (qemu, pip under emulation) and runs only from `make install-check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.device import install_check

SCRIPT = Path(install_check.__file__)
ROOT = SCRIPT.parents[2]
UNIT = (ROOT / "systemd/edge-agent.service").read_text()


def test_without_binfmt_misc_it_skips_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--binfmt-dir", str(tmp_path / "no-binfmt"),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == install_check.SKIPPED
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    expected = "binfmt_misc is not available" if os.geteuid() == 0 else "needs root"
    assert line.startswith("install-check: skipped: ") and expected in line
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone too


def stub(tmp_path: Path) -> tuple[Path, Path, Path]:
    units, calls = tmp_path / "system", tmp_path / "calls.log"
    units.mkdir()
    script = tmp_path / "systemctl"
    script.write_text(install_check.systemctl_stub(str(units), str(calls)))
    script.chmod(0o755)
    return script, units, calls


def systemctl(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)


def test_the_systemctl_stub_enables_as_systemctl_does_offline_and_logs(tmp_path: Path) -> None:
    script, units, calls = stub(tmp_path)
    (units / "edge-agent.service").write_text(UNIT)
    link = units / "multi-user.target.wants/edge-agent.service"

    off = systemctl(script, "is-enabled", "edge-agent.service")
    assert (off.returncode, off.stdout) == (1, "disabled\n")
    assert systemctl(script, "daemon-reload").returncode == 0
    assert systemctl(script, "enable", "edge-agent.service").returncode == 0
    assert os.readlink(link) == str(units / "edge-agent.service")
    on = systemctl(script, "is-enabled", "edge-agent.service")
    assert (on.returncode, on.stdout) == (0, "enabled\n")
    assert systemctl(script, "disable", "--now", "edge-agent.service").returncode == 0
    assert not link.is_symlink()
    missing = systemctl(script, "enable", "nothing.service")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert calls.read_text().splitlines() == [
        "systemctl is-enabled edge-agent.service",
        "systemctl daemon-reload",
        "systemctl enable edge-agent.service",
        "systemctl is-enabled edge-agent.service",
        "systemctl disable --now edge-agent.service",
        "systemctl enable nothing.service",
    ]


def test_the_stub_follows_every_wantedby_target(tmp_path: Path) -> None:
    script, units, _ = stub(tmp_path)
    (units / "x.service").write_text("[Service]\nExecStart=/bin/true\n[Install]\n"
                                     "WantedBy=multi-user.target graphical.target\n")  # fmt: skip
    assert systemctl(script, "enable", "x.service").returncode == 0
    for target in ("multi-user", "graphical"):
        assert (units / f"{target}.target.wants/x.service").is_symlink()


def test_the_pip_plan_is_read_from_install_sh_itself(tmp_path: Path) -> None:
    """The line the check parses to fill the wheelhouse, as install.sh prints it today."""
    root = tmp_path / "root"
    root.mkdir()
    wheel = tmp_path / "edge_deploy-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    proc = subprocess.run(
        [str(ROOT / "systemd/install.sh"), "--root", str(root), "--no-venv", "--no-systemctl",
         "--from", str(wheel), "--extra", "litert,camera"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    plan = install_check.parse_plan(proc.stdout)
    assert plan is not None, proc.stdout + proc.stderr
    constraints, spec = plan
    assert spec == f"{wheel}[litert,camera]"
    assert Path(constraints) == root / "opt/edge-agent/constraints.txt"
    assert Path(constraints).is_file()
    assert install_check.parse_plan("created: /opt/edge-agent\n") is None


def test_the_snapshot_sees_content_mode_and_mtime_but_not_pycache(tmp_path: Path) -> None:
    (tmp_path / "etc/edge-agent").mkdir(parents=True)
    config = tmp_path / "etc/edge-agent/agent.yaml"
    config.write_text("device: {id: a}\n")
    (tmp_path / "etc/edge-agent/__pycache__").mkdir()
    before = install_check.snapshot(tmp_path)
    assert "etc/edge-agent/agent.yaml" in before
    (tmp_path / "etc/edge-agent/__pycache__/x.pyc").write_bytes(b"")
    assert install_check.snapshot(tmp_path) == before
    config.chmod(0o600)
    assert install_check.snapshot(tmp_path) != before
    config.chmod(before["etc/edge-agent/agent.yaml"][1] & 0o777)
    assert install_check.snapshot(tmp_path) == before
    os.utime(config, (1, 1))
    assert install_check.snapshot(tmp_path) != before
