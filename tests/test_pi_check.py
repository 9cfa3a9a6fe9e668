"""The cheap parts of `make pi-check` (tests/device/pi_check.py): its skip paths, the mirror
it picks from apt sources, its cache key and its comparison. The check itself is slow
(debootstrap, qemu) and runs only from `make pi-check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.device import pi_check

SCRIPT = Path(pi_check.__file__)


def run_check(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=60, check=False, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def test_without_binfmt_misc_it_skips_with_one_line(tmp_path: Path) -> None:
    proc = run_check("--binfmt-dir", str(tmp_path / "no-binfmt"), "--workdir", str(tmp_path))
    assert proc.returncode == pi_check.SKIPPED
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    expected = "binfmt_misc is not available" if os.geteuid() == 0 else "needs root"
    assert line.startswith("pi-check: skipped: ") and expected in line
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone too


def test_mirror_comes_from_the_apt_sources(tmp_path: Path) -> None:
    other = tmp_path / "cloud.list"
    other.write_text("deb https://packages.example.com/apt cloud-sdk-bookworm main\n")
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\n# a comment: with a colon\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert pi_check.debian_mirror([other, deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "deb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian bookworm main\n"
    )
    assert pi_check.debian_mirror([other, one_line]) == "http://ftp.example/debian"
    with pytest.raises(pi_check.Skip, match="no Debian mirror"):
        pi_check.debian_mirror([other])


def test_cache_key_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    key = pi_check.rootfs_key()
    assert key == pi_check.rootfs_key()
    monkeypatch.setattr(pi_check, "PACKAGES", (*pi_check.PACKAGES, "python3-numpy"))
    assert pi_check.rootfs_key() != key


def test_comparison_allows_a_few_lsb_and_near_ties_only() -> None:
    scale = 0.2
    tol = pi_check.TOLERANCE_LSB * scale + 1e-5
    host = {0: [0.0, 4.0, 1.0], 1: [2.0, 2.2, 0.0]}
    labels = [1, 1]

    def result(frame: int, raw: list[float]) -> SimpleNamespace:
        return SimpleNamespace(frame=frame, raw=[raw])

    same = pi_check.compare([result(1, [0.2, 4.0, 1.0])], host, labels, tol)
    assert same.problems == [] and same.top1_agree == 1
    # Frame 202 shows image 1, where the host's top two are one LSB apart.
    tie = pi_check.compare([result(202, [2.2, 2.0, 0.0])], host, labels, tol)
    assert tie.problems == [] and tie.near_ties == 1
    off = pi_check.compare([result(1, [0.0, 4.0, 4.2])], host, labels, tol)
    assert any("top-1" in p for p in off.problems) and any("differ" in p for p in off.problems)
