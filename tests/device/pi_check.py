"""``make pi-check``: the agent on an emulated Raspberry Pi OS userland (Debian arm64).

Everything else is tested on x86_64; this runs the real thing on arm64 under qemu-user:
a debootstrapped Debian arm64 root filesystem (``--suite bookworm``, Raspberry Pi OS
Bookworm's base, Python 3.11; or ``--suite trixie``, Raspberry Pi OS Trixie's, Python 3.13;
each cached as its own tarball), this repo's wheel installed into a venv per runtime from
PyPI's aarch64 wheels (bookworm: ``tflite`` and ``litert`` extras, numpy 1; trixie:
``litert`` only, numpy 2; never TensorFlow), one ``edge-agent run`` per venv on a synthetic
digits source against a private Mosquitto on the host's loopback, a signed converter-built bundle
deployed from the host with ``python -m fleet deploy``, and the results compared with the
same bundle served by the same agent code on the host, frame image by frame image.

Prints ONE JSON line (per-step times, outcome). Exit 0 passed, 1 failed, 77 skipped (the
machine cannot do it: one line on stderr says why). Emulated timings are wall-clock times of
this check only; they say nothing about a real Pi's speed.

    sudo make pi-check            # or: PYTHONPATH=. python tests/device/pi_check.py
    sudo make pi-check PI_CHECK_ARGS="--suite trixie"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a plain script: the repo's packages come from the repo
    sys.path.insert(0, str(ROOT))

SKIPPED = 77
ARCH, VARIANT = "arm64", "minbase"
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
HOST_TOOLS = {  # binary -> Debian package
    "qemu-aarch64-static": "qemu-user-static",
    "update-binfmts": "binfmt-support",
    "debootstrap": "debootstrap",
}


@dataclass(frozen=True)
class Suite:
    """A Debian release a Raspberry Pi OS is based on, and what the agent gets there."""

    name: str
    python: str  # the suite's python3, major.minor: the check fails on another one
    numpy_major: int  # what the constraints must give the venvs
    # venv extra -> the runtime the agent must report. Never the converter extra (TensorFlow).
    runtimes: dict[str, str]
    # The constraint files, in the repo, first existing one wins (constraints/ is per target;
    # constraints.txt is the one file the repo had before it).
    constraints: tuple[str, ...]


SUITES = {
    "bookworm": Suite(
        "bookworm", "3.11", 1, {"tflite": "tflite_runtime", "litert": "ai_edge_litert"},
        ("constraints/bookworm-tflite.txt", "constraints.txt"),
    ),
    # tflite-runtime has no wheel past Python 3.11: Trixie gets ai-edge-litert and numpy 2.
    "trixie": Suite("trixie", "3.13", 2, {"litert": "ai_edge_litert"},
                    ("constraints/trixie.txt",)),
}  # fmt: skip
# Suites a Debian mirror's dists/ carries beside each other: a mirror this machine uses for
# one of them (a bookworm host's deb.debian.org) is asked whether it also serves the other.
DEBIAN_SUITES = ("bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing",
                 "oldstable", "unstable")  # fmt: skip
# qemu's default `max` CPU advertises SME, and ai-edge-litert then computes wrong int8
# results; a Pi 4 is a Cortex-A72, a Pi 5 a Cortex-A76.
QEMU_CPUS = ("cortex-a72", "cortex-a76")
CPU_PART = {"cortex-a72": "0xd08", "cortex-a76": "0xd0b"}
# x86 and ARM int8 kernels may round differently: allow this many output quantisation steps.
TOLERANCE_LSB = 3
DIGITS = 200  # images in the synthetic digits source; frame n shows image (n - 1) % DIGITS
WHEELHOUSE = "/root/wheelhouse"  # in the chroot; on the host: <cache>/wheels-<suite>-arm64
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Skip(Exception):
    """The machine cannot run the check (exit 77)."""


class Failed(Exception):
    """The check ran and something is wrong (exit 1)."""


class Stopped(BaseException):
    """SIGTERM: a BaseException, so no ``except Failed`` fallback can swallow it."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-deploy"


def run(cmd: Sequence[str], what: str, timeout: float = 1800, **kw: Any) -> str:
    """Run a command; on failure raise Failed naming ``what`` with the output's tail."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired as e:
        raise Failed(f"{what}: timed out after {timeout:.0f}s") from e
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise Failed(f"{what}: exit {proc.returncode}: " + " | ".join(tail))
    return proc.stdout


# Host preparation ---------------------------------------------------------------------


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (debootstrap, chroot, mount, binfmt_misc): run it with sudo")


def ensure_binfmt_mounted(binfmt_dir: Path, mounts: Mounts) -> None:
    if (binfmt_dir / "register").exists():
        return
    if not binfmt_dir.is_dir():
        raise Skip(f"binfmt_misc is not available: {binfmt_dir} does not exist")
    proc = subprocess.run(
        ["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (binfmt_dir / "register").exists():
        reason = proc.stderr.strip().replace("\n", " ") or "no register file"
        raise Skip(f"binfmt_misc cannot be mounted on {binfmt_dir}: {reason}")
    mounts.mounted.append(binfmt_dir)


def hold_binfmt(workdir: Path, mounts: Mounts) -> Path:
    """A second mount of binfmt_misc for as long as this check runs. The kernel (6.18 here)
    drops the registrations with the last mount: another check unmounting
    /proc/sys/fs/binfmt_misc then turned every arm64 exec in here into "Exec format error"
    (it broke a trixie debootstrap half-way). Held, they live until this mount goes too."""
    hold = workdir / "binfmt_misc"
    hold.mkdir()
    mounts.mount(hold, "-t", "binfmt_misc", "binfmt_misc")
    return hold


def other_checks_running(scripts: Sequence[str] = ("pi_check.py", "install_check.py")) -> list[int]:
    """PIDs of other emulated checks (Python running one of ``scripts``) on this machine.
    Unmounting binfmt_misc drops qemu-aarch64's registration under their feet unless they
    hold a mount (``hold_binfmt``; older checks do not), so a check that mounted it leaves
    it mounted while another one runs."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile
        if len(argv) > 1 and Path(argv[0]).name.startswith("python"):
            if Path(argv[1]).name in scripts:
                pids.append(int(proc.name))
    return pids


def ensure_host_tools() -> list[str]:
    """Install what is missing with apt-get; returns the packages installed."""
    missing = sorted({pkg for exe, pkg in HOST_TOOLS.items() if not shutil.which(exe)})
    if not missing:
        return []
    if not shutil.which("apt-get"):
        raise Skip(f"missing {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise Skip(f"missing {', '.join(missing)}; apt-get install failed: {last}")
    still = [exe for exe in HOST_TOOLS if not shutil.which(exe)]
    if still:
        raise Skip(f"still missing after apt-get install: {', '.join(still)}")
    return missing


def enable_qemu_aarch64(binfmt_dir: Path) -> None:
    entry = binfmt_dir / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise Skip("qemu-aarch64 cannot be enabled in binfmt_misc (update-binfmts failed)")


def apt_sources() -> list[Path]:
    paths = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        paths += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return paths


def apt_entries(paths: Sequence[Path]) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` entry with ``main``, one-line and deb822 alike."""
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (
                        line.partition(":")
                        for line in stanza.splitlines()
                        if ":" in line and not line.lstrip().startswith("#")
                    )
                )
                if (
                    "deb" in fields.get("types", "").split()
                    and "main" in fields.get("components", "").split()
                ):
                    for uri in fields.get("uris", "").split():
                        yield uri, fields.get("suites", "").split()
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and "main" in words[3:]:
                    yield words[1], [words[2]]


def mirror_serves(mirror: str, suite: str) -> bool:
    """Whether ``<mirror>/dists/<suite>/Release`` is there (one small HTTP request)."""
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def debian_mirror(
    suite: str, paths: Sequence[Path] | None = None, serves: Any = mirror_serves
) -> str:
    """The first Debian mirror in this machine's apt sources that carries ``suite`` main;
    failing that, the first one carrying another Debian release's main that also serves
    ``suite`` (a bookworm machine lists only bookworm, but its mirror has trixie too)."""
    entries = list(apt_entries(apt_sources() if paths is None else paths))
    for uri, suites in entries:
        if suite in suites:
            return uri
    others = list(dict.fromkeys(uri for uri, suites in entries
                                if any(s in DEBIAN_SUITES for s in suites)))  # fmt: skip
    for uri in others:
        if serves(uri, suite):
            return uri
    asked = f" ({', '.join(others)} do not serve it)" if others else ""
    raise Skip(f"no Debian mirror for {suite} main in this machine's apt sources{asked}")


# Mounts and processes: everything started is stopped, everything mounted unmounted ------


@dataclass
class Mounts:
    mounted: list[Path] = field(default_factory=list)

    def mount(self, target: Path, *args: str) -> None:
        run(["mount", *args, str(target)], f"mount {target}")
        self.mounted.append(target)

    def bind(self, source: Path, target: Path, readonly: bool = False) -> None:
        self.mount(target, "--bind", str(source))
        if readonly:
            run(["mount", "-o", "remount,bind,ro", str(target)], f"remount {target} ro")

    def unmount_all(self, under: Path | None) -> list[str]:
        """Ours in reverse order, then anything a child left under ``under`` (debootstrap
        mounts /proc and /sys in its target). Returns what could not be unmounted."""
        problems = []
        targets = list(reversed(self.mounted))
        self.mounted.clear()
        if under is not None:
            targets += sorted(mounted_under(under), key=lambda p: -len(p.parts))
        for target in targets:
            if target not in mounted_under(target):
                continue
            for cmd in (["umount", str(target)], ["umount", "-l", str(target)]):
                if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                    break
            else:
                problems.append(str(target))
        return problems


def mounted_under(path: Path) -> list[Path]:
    prefix = str(path).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return found


@dataclass
class Processes:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Any:
        with log.open("ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout: float = 20.0) -> dict[int, int | None]:
        codes: dict[int, int | None] = {}
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            codes[proc.pid] = proc.returncode
        self.procs.clear()
        return codes


# The root filesystem ------------------------------------------------------------------


def build_rootfs(root: Path, suite: str, mirror: str) -> None:
    """The recipe: a minbase arm64 of ``suite`` with Python. Its source is part of the cache
    key. debootstrap's scripts/<suite> (trixie -> sid on a bookworm host) and the host's
    debian-archive-keyring (bookworm's has trixie's keys) do the rest."""
    run(
        ["debootstrap", f"--arch={ARCH}", f"--variant={VARIANT}",
         "--include=" + ",".join(PACKAGES), suite, str(root), mirror],
        "debootstrap", timeout=3600,
    )  # fmt: skip
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / leftover).glob("*.deb" if "archives" in leftover else "*_*"):
            p.unlink()


def rootfs_key(suite: str) -> str:
    recipe = {
        "suite": suite,
        "arch": ARCH,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "recipe": inspect.getsource(build_rootfs),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def tar_compression() -> list[str]:
    return ["-I", "zstd -T0 -3"] if shutil.which("zstd") else ["-z"]


def rootfs_tarball(cache: Path, suite: str) -> Path:
    suffix = ".tar.zst" if shutil.which("zstd") else ".tar.gz"
    return cache / f"rootfs-{suite}-{ARCH}-{rootfs_key(suite)}{suffix}"


def wheelhouse_dir(cache: Path, suite: str) -> Path:
    """PyPI's aarch64 wheels for one suite: its Python and pins differ from another's."""
    return cache / f"wheels-{suite}-{ARCH}"


def constraints_file(suite: Suite, root: Path = ROOT) -> Path:
    for name in suite.constraints:
        if (root / name).is_file():
            return root / name
    raise Failed(f"no constraints for {suite.name}: none of {', '.join(suite.constraints)}")


def rootfs_from_cache(root: Path, cache: Path, suite: str) -> bool:
    """Extract the cached tarball into ``root``, building it first on a miss.
    Returns True on a cache hit."""
    tarball = rootfs_tarball(cache, suite)
    root.mkdir(parents=True)
    if tarball.is_file():
        run(["tar", *tar_compression(), "--numeric-owner", "-xpf", str(tarball), "-C",
             str(root)], "extract the cached rootfs")  # fmt: skip
        return True
    build_rootfs(root, suite, debian_mirror(suite))
    problems = Mounts().unmount_all(root)  # debootstrap's own /proc and /sys, if it left any
    if problems:
        raise Failed(f"debootstrap left mounts that cannot be unmounted: {problems}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial")
    run(["tar", *tar_compression(), "--numeric-owner", "-cpf", str(partial), "-C", str(root),
         "."], "write the rootfs cache")  # fmt: skip
    partial.rename(tarball)
    for old in cache.glob(f"rootfs-{suite}-{ARCH}-*"):
        if old != tarball:
            old.unlink()
    return False


def pi_cpuinfo(cpu: str) -> str:
    core = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: {CPU_PART[cpu]}\nCPU revision\t: 3\n\n"
    )
    model = "Raspberry Pi 4 Model B Rev 1.5" if cpu == "cortex-a72" else "Raspberry Pi 5 Model B"
    return (
        "".join(core.format(n=n) for n in range(4))
        + f"Revision\t: d03115\nSerial\t\t: 10000000deadbeef\nModel\t\t: {model}\n"
    )


class Chroot:
    """Commands in the arm64 root under ``env -i``: no host PIP_* or proxy leaks in."""

    def __init__(self, root: Path, qemu_cpu: str) -> None:
        self.root = root
        self.qemu_cpu = qemu_cpu

    def argv(self, *cmd: str) -> list[str]:
        return ["env", "-i", f"PATH={CHROOT_PATH}", "HOME=/root", "LANG=C.UTF-8",
                f"QEMU_CPU={self.qemu_cpu}", "chroot", str(self.root), *cmd]  # fmt: skip

    def run(self, what: str, *cmd: str, timeout: float = 1800) -> str:
        return run(self.argv(*cmd), what, timeout=timeout)


def add_host_certificates(root: Path) -> int:
    """The host's extra CA certificates (a proxy's, a company's), as ``update-ca-certificates``
    would add them: into /usr/local/share/ca-certificates and appended to the bundle that pip
    and Python's ssl read. Done from the host: under emulation the tool takes ~40 s."""
    extra = root / "usr/local/share/ca-certificates"
    extra.mkdir(parents=True, exist_ok=True)
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    with bundle.open("a") as out:
        for crt in certs:
            shutil.copyfile(crt, extra / crt.name)
            pem = crt.read_text()
            out.write(pem if pem.endswith("\n") else pem + "\n")
    return len(certs)


def prepare_chroot(chroot: Chroot, mounts: Mounts, workdir: Path, wheelhouse: Path) -> str:
    """Host CA certificates, pip config, DNS; /proc with a Pi's cpuinfo, /sys, /dev/shm,
    the arm64 wheelhouse. Returns the machine the chroot reports."""
    root = chroot.root
    for name in ("resolv.conf", "hosts"):
        if Path("/etc", name).exists():
            (root / "etc" / name).unlink(missing_ok=True)
            shutil.copyfile(Path("/etc", name), root / "etc" / name)
    if Path("/etc/pip.conf").is_file():
        shutil.copyfile("/etc/pip.conf", root / "etc/pip.conf")
    add_host_certificates(root)
    cpuinfo = workdir / "cpuinfo"
    cpuinfo.write_text(pi_cpuinfo(chroot.qemu_cpu))
    mounts.mount(root / "proc", "-t", "proc", "proc")
    mounts.bind(cpuinfo, root / "proc/cpuinfo", readonly=True)
    mounts.mount(root / "sys", "-t", "sysfs", "-o", "ro", "sysfs")
    (root / "dev/shm").mkdir(parents=True, exist_ok=True)
    mounts.mount(root / "dev/shm", "-t", "tmpfs", "-o", "mode=1777", "shm")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    (root / WHEELHOUSE.lstrip("/")).mkdir(parents=True, exist_ok=True)
    mounts.bind(wheelhouse, root / WHEELHOUSE.lstrip("/"))
    return chroot.run("uname -m", "uname", "-m").strip()


# The agent's wheel and venvs ----------------------------------------------------------


def build_wheel(dest: Path) -> Path:
    """``pip wheel --no-deps`` of the working tree, built from a copy so the tree stays clean."""
    src = dest / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*cache*"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(src)],
        "pip wheel --no-deps .")  # fmt: skip
    (wheel,) = dest.glob("edge_deploy-*.whl")
    return wheel


VERSIONS = (
    "import importlib.metadata as m, json, platform, sys\n"
    "names = ['edge-deploy', 'numpy', 'tflite-runtime', 'ai-edge-litert', 'tensorflow',"
    " 'tensorflow-cpu', 'paho-mqtt', 'pydantic', 'cryptography']\n"
    "v = {}\n"
    "for n in names:\n"
    "    try: v[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "import ctypes\n"
    "aux = ctypes.CDLL(None).getauxval\n"
    "aux.restype = ctypes.c_ulong\n"
    "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
    " 'hwcap2': aux(26), 'packages': v}))\n"
)
HWCAP2_SME = 1 << 23  # what qemu's default `max` CPU advertises and a Pi does not have


def install_venv(chroot: Chroot, extra: str, wheel: Path) -> dict[str, Any]:
    """A venv at /opt/edge-<extra> with the agent and that extra only; returns its versions.

    Dependencies come from the wheelhouse (PyPI's aarch64 wheels, kept on the host between
    runs) and, when it lacks something, are downloaded into it from PyPI first."""
    venv = f"/opt/edge-{extra}"
    pip = [f"{venv}/bin/pip", "--disable-pip-version-check"]
    target = f"/tmp/edge/{wheel.name}[{extra}]"
    constraints = ["-c", "/tmp/edge/constraints.txt"]
    chroot.run(f"venv {extra}", "python3", "-m", "venv", venv)
    offline = [*pip, "install", "-q", "--no-compile", "--no-index", "--find-links", WHEELHOUSE,
               *constraints, target]  # fmt: skip
    try:
        chroot.run(f"pip install [{extra}] from the wheelhouse", *offline)
    except Failed:
        chroot.run(f"pip download [{extra}]", *pip, "download", "-q", "-d", WHEELHOUSE,
                   *constraints, target)  # fmt: skip
        # This build of the agent is installed from its path, never from the wheelhouse.
        for built in (chroot.root / WHEELHOUSE.lstrip("/")).glob("edge_deploy-*"):
            built.unlink()
        chroot.run(f"pip install [{extra}]", *offline)
    chroot.run(f"pip check ({extra})", *pip, "check")
    info: dict[str, Any] = json.loads(chroot.run(f"versions ({extra})", f"{venv}/bin/python",
                                                 "-c", VERSIONS))  # fmt: skip
    packages = info["packages"]
    if "tensorflow" in packages or "tensorflow-cpu" in packages:
        raise Failed(f"the {extra} venv pulled in TensorFlow: {packages}")
    if info["hwcap2"] & HWCAP2_SME:
        raise Failed(f"the emulated CPU advertises SME: QEMU_CPU={chroot.qemu_cpu} did not apply")
    if info["machine"] != "aarch64":
        raise Failed(f"the {extra} venv runs on {info['machine']}, not aarch64")
    return info


def check_versions(suite: Suite, extra: str, info: dict[str, Any]) -> None:
    """The venv has the suite's Python and numpy: a wrong pin or rootfs shows here, not as
    a confusing difference in the results."""
    python = ".".join(info["python"].split(".")[:2])
    if python != suite.python:
        raise Failed(f"the {extra} venv runs Python {info['python']}, not {suite.python}")
    numpy = info["packages"].get("numpy", "?")
    if numpy.split(".")[0] != str(suite.numpy_major):
        raise Failed(f"the {extra} venv has numpy {numpy}, not {suite.numpy_major}.x")


# The run: broker, agents, deploy, results ---------------------------------------------


def agent_config(device: str, runtime: str, state_dir: str, port: int, pub: str) -> dict[str, Any]:
    return {
        "device": {"id": device},
        "state_dir": state_dir,
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"prefer": runtime, "num_threads": 2},
        "models": {
            "trusted_keys": [pub],
            # Under emulation the validation child needs far longer to import its runtime.
            "validation": {"timeout_s": 900, "memory_mb": 2048},
            "probation": {"duration_s": 2, "min_inferences": 5},
        },
        "telemetry": {"interval_s": 10},
        "pipelines": [
            {
                "name": "digits",
                "model": "digits",
                "queue": "fifo",
                # 8x8 is the model's input size: no resize, so both sides feed the same tensor
                # whether or not OpenCV is installed.
                "source": {"type": "synthetic", "kind": "digits", "width": 8, "height": 8,
                           "channels": 1, "fps": 20},
            }
        ],
    }  # fmt: skip


@dataclass
class Verdict:
    results: int
    top1_agree: int
    near_ties: int
    max_diff: float
    accuracy: float
    problems: list[str]


def first_output(result: Any) -> list[float]:
    """The values of a ``raw`` result's first output (``Result.raw[0]``, a ``RawTensor``)."""
    if not result.raw or result.raw[0].values is None:
        raise Failed(f"frame {result.frame}: a result without the raw output's values")
    return list(result.raw[0].values)


def compare(
    device: list[Any], host: dict[int, list[float]], labels: Any, tolerance: float
) -> Verdict:
    """Each device result against the host's output for the same image."""
    agree = ties = right = 0
    worst = 0.0
    problems: list[str] = []
    for r in device:
        image = (r.frame - 1) % DIGITS
        ours, ref = first_output(r), host[image]
        diff = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
        worst = max(worst, diff)
        top, ref_top = ours.index(max(ours)), ref.index(max(ref))
        right += top == int(labels[image])
        if top == ref_top:
            agree += 1
        elif ref[ref_top] - ref[top] <= tolerance:
            ties += 1  # the host itself had these two within the tolerance
        else:
            problems.append(f"frame {r.frame}: top-1 {top} on the device, {ref_top} on the host")
        if diff > tolerance:
            problems.append(f"frame {r.frame}: outputs differ by {diff:.4f} > {tolerance:.4f}")
    return Verdict(len(device), agree, ties, worst, right / max(1, len(device)), problems)


class Steps:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = round(time.monotonic() - t0, 1)


def wait_for(predicate: Any, timeout: float, what: str, alive: Sequence[Any] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc, log in alive:
            if proc.poll() is not None:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
                raise Failed(f"{log.stem} exited with {proc.returncode} while waiting for "
                             f"{what}: {tail}")  # fmt: skip
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def check(args: argparse.Namespace, steps: Steps, report: dict[str, Any]) -> None:
    suite = SUITES[args.suite]
    runtimes = suite.runtimes
    mounts, procs = Mounts(), Processes()
    workdir = Path(tempfile.mkdtemp(prefix="pi-check-", dir=args.workdir))
    root = workdir / "rootfs"
    report["workdir"] = str(workdir)
    collector: Any = None
    broker: Any = None
    failed = True
    try:
        with steps.step("host_setup"):
            ensure_binfmt_mounted(args.binfmt_dir, mounts)
            report["installed"] = ensure_host_tools()
            enable_qemu_aarch64(args.binfmt_dir)
            hold_binfmt(workdir, mounts)
        with steps.step("rootfs"):
            hit = rootfs_from_cache(root, args.cache, suite.name)
            report["rootfs_cache"] = "hit" if hit else "miss"
        chroot = Chroot(root, args.qemu_cpu)
        with steps.step("chroot_setup"):
            report["chroot_machine"] = prepare_chroot(
                chroot, mounts, workdir, wheelhouse_dir(args.cache, suite.name)
            )
            if report["chroot_machine"] != "aarch64":
                raise Failed(f"the chroot runs as {report['chroot_machine']}, not aarch64")
        edge = root / "tmp/edge"
        edge.mkdir(parents=True)
        with steps.step("wheel"):
            wheel = build_wheel(workdir / "wheel")
            shutil.copy2(wheel, edge / wheel.name)
            constraints = constraints_file(suite)
            shutil.copy2(constraints, edge / "constraints.txt")
            report["constraints"] = str(constraints.relative_to(ROOT))
        versions: dict[str, Any] = {}
        for extra in runtimes:
            with steps.step(f"venv_{extra}"):
                versions[extra] = install_venv(chroot, extra, wheel)
                check_versions(suite, extra, versions[extra])

        # Imported here: a machine that skips needs none of this (and TF loads only to convert).
        from agent.loops.sources.synthetic import digit_samples
        from agent.models.manifest import generate_keypair
        from agent.protocol import Result, State
        from tests.converter_support import build_digits_bundle
        from tests.mqtt_support import Broker, MessageCollector

        with steps.step("bundle"):
            private, public = generate_keypair()
            (workdir / "fleet.key").write_bytes(private)
            (workdir / "fleet.pub").write_bytes(public)
            (edge / "fleet.pub").write_bytes(public)
            bundle = build_digits_bundle(workdir / "digits-1", "1",
                                         sign_key=workdir / "fleet.key", task="raw")  # fmt: skip
            manifest = json.loads((bundle / "manifest.json").read_text())
            scale = float(manifest["outputs"][0]["scale"])
            tolerance = TOLERANCE_LSB * scale + 1e-5  # results carry 6 decimals

        with steps.step("agents_online"):
            broker = Broker(workdir / "mosquitto")
            broker.start()
            collector = MessageCollector(broker, ["edge/+/state", "edge/+/results/+"])
            devices: dict[str, tuple[str, str]] = {}  # device -> (extra, where)
            logs = []
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            for extra, runtime in runtimes.items():
                pi, host = f"pi-{extra}", f"host-{extra}"
                devices[pi], devices[host] = (extra, "pi"), (extra, "host")
                cfg = agent_config(pi, runtime, f"/var/lib/edge-agent-{extra}", broker.port,
                                   "/tmp/edge/fleet.pub")  # fmt: skip
                (edge / f"{pi}.yaml").write_text(json.dumps(cfg))
                log = workdir / f"{pi}.log"
                proc = procs.start(chroot.argv(f"/opt/edge-{extra}/bin/edge-agent", "run",
                                               f"/tmp/edge/{pi}.yaml"), log)  # fmt: skip
                logs.append((proc, log))
                cfg = agent_config(host, runtime, str(workdir / f"state-{host}"), broker.port,
                                   str(workdir / "fleet.pub"))  # fmt: skip
                (workdir / f"{host}.yaml").write_text(json.dumps(cfg))
                log = workdir / f"{host}.log"
                proc = procs.start([sys.executable, "-m", "agent", "run",
                                    str(workdir / f"{host}.yaml")], log, env=env)  # fmt: skip
                logs.append((proc, log))

            def of(kind: str, device: str) -> list[Any]:
                model = State if kind == "state" else Result
                return [model.model_validate_json(m.payload) for m in list(collector.messages)
                        if m.topic.split("/")[1:3] == [device, kind]]  # fmt: skip

            def online(device: str) -> bool:
                return any(s.online for s in of("state", device))

            wait_for(lambda: all(online(d) for d in devices), args.timeout,
                     f"all {len(devices)} agents online", logs)  # fmt: skip
            for device, (extra, _) in devices.items():
                state = next(s for s in of("state", device) if s.online)
                if state.runtime is None or state.runtime.name != runtimes[extra]:
                    raise Failed(f"{device} serves with {state.runtime}, not {runtimes[extra]}")

        with steps.step("deploy"):
            proc = subprocess.run(
                [sys.executable, "-m", "fleet", "deploy", str(bundle), "--host", "127.0.0.1",
                 "--port", str(broker.port), "--device", *devices, "--pub",
                 str(workdir / "fleet.pub"), "--json", "--timeout", str(args.timeout)],
                capture_output=True, text=True, env=env, timeout=args.timeout + 60, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise Failed(
                    f"fleet deploy exit {proc.returncode}: "
                    + " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
                )

        with steps.step("results"):

            def enough() -> bool:
                return all(
                    len(of("results", d)) >= (args.results if where == "pi" else DIGITS)
                    for d, (_, where) in devices.items()
                )  # fmt: skip

            wait_for(enough, args.timeout, "results from every agent", logs)
            _, labels = digit_samples()
            outcome: dict[str, Any] = {}
            problems: list[str] = []
            for extra, runtime in runtimes.items():
                reference = {
                    (r.frame - 1) % DIGITS: first_output(r) for r in of("results", f"host-{extra}")
                }
                pi_results = of("results", f"pi-{extra}")
                verdict = compare(pi_results, reference, labels, tolerance)
                outcome[runtime] = {
                    "results": verdict.results,
                    "top1_agreement": round(verdict.top1_agree / max(1, verdict.results), 4),
                    "near_ties": verdict.near_ties,
                    "max_abs_diff": round(verdict.max_diff, 6),
                    "max_diff_lsb": round(verdict.max_diff / scale, 2),
                    "accuracy_vs_labels": round(verdict.accuracy, 4),
                    "versions": versions[extra]["packages"],
                }
                problems += [f"{runtime}: {p}" for p in verdict.problems[:5]]
                if verdict.accuracy < 0.9:
                    problems.append(f"{runtime}: accuracy {verdict.accuracy:.2f} < 0.9")
            report["runtimes"] = outcome
            report["python"] = next(iter(versions.values()))["python"]
            report["tolerance"] = {"lsb": TOLERANCE_LSB, "output_scale": scale}
            if problems:
                raise Failed("; ".join(problems))
        failed = False
    finally:
        with steps.step("cleanup"):
            codes = procs.stop_all()
            if collector is not None:
                collector.close()
            if broker is not None:
                broker.stop()
            if failed:
                for log in sorted(workdir.glob("*.log")):
                    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                    print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            if args.binfmt_dir in mounts.mounted and (others := other_checks_running()):
                mounts.mounted.remove(args.binfmt_dir)
                report["binfmt_misc"] = f"left mounted: other checks are running ({others})"
            stuck = mounts.unmount_all(root)
            if stuck or mounted_under(workdir):
                report["cleanup"] = (
                    f"still mounted, {workdir} kept: {stuck or mounted_under(workdir)}"
                )
            elif args.keep:
                report["cleanup"] = f"kept {workdir}"
            else:
                shutil.rmtree(workdir, ignore_errors=True)
            bad = {pid: c for pid, c in codes.items() if c not in (0, None)}
            if bad and not failed:
                raise Failed(f"agents exited uncleanly on SIGTERM: {bad}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pi-check", description=__doc__.splitlines()[0])
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="bookworm",
        help="bookworm (Raspberry Pi OS Bookworm: Python 3.11, tflite-runtime and "
        "ai-edge-litert, default) or trixie (Pi OS Trixie: Python 3.13, ai-edge-litert, numpy 2)",
    )
    p.add_argument(
        "--qemu-cpu",
        choices=QEMU_CPUS,
        default="cortex-a72",
        help="emulated CPU: cortex-a72 (Pi 4, default) or cortex-a76 (Pi 5)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=cache_dir(),
        help="rootfs tarball and arm64 pip cache (default ~/.cache/edge-deploy)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory")
    p.add_argument("--binfmt-dir", type=Path, default=Path("/proc/sys/fs/binfmt_misc"))
    p.add_argument("--results", type=int, default=100, help="results to compare per runtime")
    p.add_argument("--timeout", type=float, default=600, help="seconds per waiting step")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)  # fmt: skip


def run_reported(
    name: str,
    args: argparse.Namespace,
    check_fn: Callable[[argparse.Namespace, Steps, dict[str, Any]], None],
) -> int:
    """Run an emulated check and print its one JSON report: 0 passed, 1 failed,
    SKIPPED when this machine cannot run it (said on stderr). Shared by pi-check and
    install-check, so both report and stop alike."""
    steps = Steps()
    report: dict[str, Any] = {
        "check": name,
        "arch": ARCH,
        "suite": args.suite,
        "qemu_cpu": args.qemu_cpu,
        "note": "emulated (qemu-user): step times are this check's, not a Pi's performance",
    }

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        ensure_root()
        check_fn(args, steps, report)
        report["outcome"], code = "passed", 0
    except Skip as e:
        print(f"{name}: skipped: {e}", file=sys.stderr)
        return SKIPPED
    except (Failed, Stopped) as e:
        report["outcome"], report["error"], code = "failed", str(e), 1
    except (Exception, KeyboardInterrupt) as e:
        report["outcome"], report["error"], code = "failed", f"{type(e).__name__}: {e}", 1
    report["steps"] = steps.times
    report["total_s"] = round(time.monotonic() - steps.started, 1)
    print(json.dumps(report), flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run_reported("pi-check", parse_args(argv), check)


if __name__ == "__main__":
    sys.exit(main())
