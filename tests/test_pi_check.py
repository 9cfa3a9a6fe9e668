"""The cheap parts of `make pi-check` (tests/device/pi_check.py): its skip paths, the suites
and what each gets (constraints, cache), the mirror it picks from apt sources, its cache key
and its comparison. The check itself is slow
(debootstrap, qemu) and runs only from `make pi-check`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.protocol import RawTensor, Result
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
    assert pi_check.debian_mirror("bookworm", [other, deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "deb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian bookworm main\n"
    )
    assert pi_check.debian_mirror("bookworm", [other, one_line]) == "http://ftp.example/debian"
    with pytest.raises(pi_check.Skip, match="no Debian mirror"):
        pi_check.debian_mirror("bookworm", [other])


def test_a_trixie_mirror_is_the_bookworm_one_when_it_serves_trixie(tmp_path: Path) -> None:
    """This machine is bookworm: its sources list no trixie, but its Debian mirror has it."""
    other = tmp_path / "cloud.list"
    other.write_text("deb https://packages.example.com/apt cloud-sdk-bookworm main\n")
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    asked: list[tuple[str, str]] = []

    def serves(mirror: str, suite: str) -> bool:
        asked.append((mirror, suite))
        return mirror == "http://mirror.example/debian"

    found = pi_check.debian_mirror("trixie", [other, deb822], serves=serves)
    assert found == "http://mirror.example/debian"
    # Only a Debian release's mirror is asked: not the cloud repo, not -security.
    assert asked == [("http://mirror.example/debian", "trixie")]
    with pytest.raises(pi_check.Skip, match="do not serve it"):
        pi_check.debian_mirror("trixie", [other, deb822], serves=lambda m, s: False)
    # A source that lists trixie itself is taken without asking.
    listed = tmp_path / "trixie.list"
    listed.write_text("deb http://trixie.example/debian trixie main\n")
    assert pi_check.debian_mirror("trixie", [deb822, listed], serves=None) == (
        "http://trixie.example/debian"
    )


def test_cache_key_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    key = pi_check.rootfs_key("bookworm")
    assert key == pi_check.rootfs_key("bookworm")
    monkeypatch.setattr(pi_check, "PACKAGES", (*pi_check.PACKAGES, "python3-numpy"))
    assert pi_check.rootfs_key("bookworm") != key


def test_each_suite_has_its_own_rootfs_and_wheelhouse(tmp_path: Path) -> None:
    bookworm = pi_check.rootfs_tarball(tmp_path, "bookworm")
    trixie = pi_check.rootfs_tarball(tmp_path, "trixie")
    assert pi_check.rootfs_key("bookworm") != pi_check.rootfs_key("trixie")
    assert bookworm.name.startswith("rootfs-bookworm-arm64-")
    assert trixie.name.startswith("rootfs-trixie-arm64-")
    # A new tarball replaces its own suite's old ones only (the glob rootfs_from_cache uses).
    assert not trixie.match(f"rootfs-bookworm-{pi_check.ARCH}-*")
    assert pi_check.wheelhouse_dir(tmp_path, "bookworm") != pi_check.wheelhouse_dir(
        tmp_path, "trixie"
    )


def test_suite_option_defaults_to_bookworm_and_takes_trixie() -> None:
    assert pi_check.parse_args([]).suite == "bookworm"
    assert pi_check.parse_args(["--suite", "trixie"]).suite == "trixie"
    with pytest.raises(SystemExit):
        pi_check.parse_args(["--suite", "buster"])
    assert set(pi_check.SUITES["bookworm"].runtimes) == {"tflite", "litert"}
    assert set(pi_check.SUITES["trixie"].runtimes) == {"litert"}  # no tflite-runtime for 3.13


def test_constraints_are_per_suite(tmp_path: Path) -> None:
    bookworm, trixie = pi_check.SUITES["bookworm"], pi_check.SUITES["trixie"]
    assert pi_check.constraints_file(trixie) == pi_check.ROOT / "constraints/trixie.txt"
    # Bookworm takes its per-target file when there is one, else the old constraints.txt.
    (tmp_path / "constraints.txt").write_text("numpy==1.26.4\n")
    assert pi_check.constraints_file(bookworm, tmp_path) == tmp_path / "constraints.txt"
    (tmp_path / "constraints").mkdir()
    (tmp_path / "constraints/bookworm-tflite.txt").write_text("numpy==1.26.4\n")
    assert pi_check.constraints_file(bookworm, tmp_path) == (
        tmp_path / "constraints/bookworm-tflite.txt"
    )
    with pytest.raises(pi_check.Failed, match="no constraints for trixie"):
        pi_check.constraints_file(trixie, tmp_path)


def pins(path: Path) -> dict[str, str]:
    """name -> version of each ``name==version`` line (markers and other lines ignored)."""
    found = (re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
             for line in path.read_text().splitlines())  # fmt: skip
    return {m[1].lower().replace("_", "-"): m[2] for m in found if m}


def test_each_suites_constraints_give_its_numpy_and_only_its_runtimes() -> None:
    for suite in pi_check.SUITES.values():
        pinned = pins(pi_check.constraints_file(suite))
        assert pinned["numpy"].split(".")[0] == str(suite.numpy_major), suite.name
        assert "ai-edge-litert" in pinned
        assert ("tflite-runtime" in pinned) == ("tflite" in suite.runtimes), suite.name


def test_a_venv_with_another_python_or_numpy_fails() -> None:
    trixie = pi_check.SUITES["trixie"]
    good = {"python": "3.13.5", "packages": {"numpy": "2.5.5"}}
    pi_check.check_versions(trixie, "litert", good)
    with pytest.raises(pi_check.Failed, match="Python 3.11.2, not 3.13"):
        pi_check.check_versions(trixie, "litert", {**good, "python": "3.11.2"})
    with pytest.raises(pi_check.Failed, match="numpy 1.26.4, not 2.x"):
        pi_check.check_versions(trixie, "litert", {**good, "packages": {"numpy": "1.26.4"}})


def test_comparison_allows_a_few_lsb_and_near_ties_only() -> None:
    scale = 0.2
    tol = pi_check.TOLERANCE_LSB * scale + 1e-5
    host = {0: [0.0, 4.0, 1.0], 1: [2.0, 2.2, 0.0]}
    labels = [1, 1]

    def result(frame: int, values: list[float]) -> Result:
        # Real wire messages: a stand-in once hid that ``raw`` became a list of RawTensor.
        message = Result(
            device="pi-tflite", pipeline="digits", seq=frame, ts=0.0, frame=frame,
            model="digits", version="1", latency_ms=1.0,
            raw=[RawTensor(shape=[1, len(values)], values=values)],
        )  # fmt: skip
        return Result.model_validate_json(message.model_dump_json())

    same = pi_check.compare([result(1, [0.2, 4.0, 1.0])], host, labels, tol)
    assert same.problems == [] and same.top1_agree == 1
    # Frame 202 shows image 1, where the host's top two are one LSB apart.
    tie = pi_check.compare([result(202, [2.2, 2.0, 0.0])], host, labels, tol)
    assert tie.problems == [] and tie.near_ties == 1
    off = pi_check.compare([result(1, [0.0, 4.0, 4.2])], host, labels, tol)
    assert any("top-1" in p for p in off.problems) and any("differ" in p for p in off.problems)
    summarised = result(1, [0.2, 4.0, 1.0]).model_copy(
        update={"raw": [RawTensor(shape=[1, 3], max=4.0)]}
    )
    with pytest.raises(pi_check.Failed, match="without the raw output's values"):
        pi_check.compare([summarised], host, labels, tol)


def test_other_running_checks_are_found_by_their_script(tmp_path: Path) -> None:
    """A check that mounted binfmt_misc leaves it mounted while another check runs."""
    script = tmp_path / "install_check.py"
    script.write_text("import sys\nsys.stdin.read()\n")
    other = tmp_path / "something_else.py"
    other.write_text(script.read_text())
    procs = [
        subprocess.Popen([sys.executable, str(p)], stdin=subprocess.PIPE) for p in (script, other)
    ]
    try:
        found = pi_check.other_checks_running()
        assert procs[0].pid in found and procs[1].pid not in found
        assert os.getpid() not in found
    finally:
        for proc in procs:
            proc.communicate(b"", timeout=30)
    assert procs[0].pid not in pi_check.other_checks_running()


HOLD_SCRIPT = """
import subprocess, sys
from pathlib import Path
from tests.device import pi_check
top, work = Path(sys.argv[1]) / "top", Path(sys.argv[1]) / "work"
top.mkdir(); work.mkdir()
def mount(): subprocess.run(["mount", "-t", "binfmt_misc", "none", str(top)], check=True)
mount()
(top / "register").write_text(":pi-check-test:E::pichecktest::/bin/cat:")
mounts = pi_check.Mounts()
if sys.argv[2] == "hold":
    pi_check.hold_binfmt(work, mounts)
subprocess.run(["umount", str(top)], check=True)  # what another check's cleanup does
mount()
print((top / "pi-check-test").exists())
"""


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_a_held_binfmt_misc_keeps_its_registrations_when_another_check_unmounts_it(
    tmp_path: Path,
) -> None:
    """In a private user namespace (its own binfmt_misc): with this check's hold mount a
    registration outlives the shared mount's unmount; without it, it is gone."""
    seen = {}
    for mode in ("hold", "none"):
        (tmp_path / mode).mkdir()
        proc = subprocess.run(
            ["unshare", "-U", "-r", "-m", "--fork", sys.executable, "-c", HOLD_SCRIPT,
             str(tmp_path / mode), mode],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(pi_check.ROOT)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        seen[mode] = proc.stdout.strip()
    assert seen == {"hold": "True", "none": "False"}
