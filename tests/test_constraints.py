"""Each device target's constraints file resolves for that target from PyPI's wheels
alone: pip's cross-platform dry run (its Python, aarch64, its glibc), with the project's
own requirements and the target's extras. A pin without a wheel there, or two pins that
conflict, fails here rather than on a device. Needs PyPI, which this machine and CI reach.

pip evaluates dependency markers (``numpy>=2.1; python_version>='3.13'`` in ml-dtypes) with
the Python it runs on, whatever ``--python-version`` says, so each target is resolved only
by its own Python: bookworm-tflite by `make test` (3.11), jetpack6 and trixie by
`make test-pythons` (3.10 and 3.13)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (make test-pythons)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# target: (Python, newest manylinux glibc of the OS, extras installed there)
TARGETS = {
    "bookworm-tflite": ("3.11", 36, "tflite,litert,camera,metrics"),  # Debian 12, glibc 2.36
    "trixie": ("3.13", 41, "litert,camera,metrics,audio"),  # Debian 13, glibc 2.41
    "jetpack6": ("3.10", 35, "litert,camera,metrics,audio"),  # Ubuntu 22.04, glibc 2.35
}


RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"
HERE = sorted(t for t, (python, _glibc, _extras) in TARGETS.items() if python == RUNNING)


def requirements(extras: str) -> list[str]:
    reqs = list(PROJECT["dependencies"])
    for extra in extras.split(","):
        reqs += PROJECT["optional-dependencies"][extra]
    return reqs


def pins(target: str) -> dict[str, str]:
    text = (ROOT / f"constraints/{target}.txt").read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)
    return {name.lower().replace("_", "-"): version for name, version in found}


def test_every_constraints_file_is_a_target() -> None:
    files = {p.stem for p in (ROOT / "constraints").glob("*.txt")}
    # workstation and torch are made and checked by `make setup` / `make setup-torch` (pip check)
    assert files == {*TARGETS, "workstation", "torch"}


@pytest.mark.parametrize("target", HERE)
def test_constraints_resolve_from_wheels_for_the_target(target: str, tmp_path: Path) -> None:
    python, glibc, extras = TARGETS[target]
    platforms = [f"manylinux_2_{g}_aarch64" for g in range(17, glibc + 1)]
    platforms += ["manylinux2014_aarch64", "linux_aarch64"]
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--only-binary=:all:", "--python-version", python,
         *(arg for p in platforms for arg in ("--platform", p)),
         "--disable-pip-version-check", "--quiet", "--report", str(report),
         "-c", str(ROOT / f"constraints/{target}.txt"), *requirements(extras)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"constraints/{target}.txt does not resolve for Python {python} aarch64 from PyPI's "
        f"wheels (or PyPI is unreachable):\n{result.stderr[-3000:]}"
    )
    resolved = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    # Every pin is one the target installs: a stale pin would pin nothing.
    assert pins(target).items() <= resolved.items(), (pins(target), resolved)
    numpy_major = int(resolved["numpy"].split(".")[0])
    assert numpy_major == (1 if "tflite" in extras else 2), resolved["numpy"]
    assert "tensorflow" not in resolved and "tensorflow-cpu" not in resolved
