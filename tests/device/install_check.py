"""``make install-check``: ``systemd/install.sh`` on an emulated fresh Raspberry Pi OS (arm64).

``tests/test_install.py`` runs install.sh with ``--root`` on the workstation, where every host
change is only printed. This runs it for real, as root, in a fresh copy of pi-check's cached
Debian arm64 root filesystem under qemu-user, the way a user runs it on a Pi: this repo's
working tree copied to ``/home/pi/edge-deploy`` and ``sudo systemd/install.sh`` from there,
offline (``PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse>``, the documented offline install) with
the agent's wheel built from the tree (``--from``). The chroot has no systemd, so
``systemctl`` and ``systemd-analyze`` are stubs on PATH that log every call; the stub's
``enable``/``is-enabled``/``disable`` act on the ``[Install] WantedBy=`` symlinks as systemctl
does offline. Then it checks what install.sh left: the unit, the ``edge-agent`` user and its
groups, the venv importing its runtime, the config, ``edge-agent check --offline`` as the
agent's user, the systemctl calls made, and that a second run changes nothing and keeps an
operator's edited config.

Prints ONE JSON line. Exit 0 passed, 1 failed, 77 skipped (one line on stderr says why).

    sudo make install-check       # INSTALL_CHECK_ARGS="--suite trixie --keep"
    sudo PYTHONPATH=. .venv/bin/python tests/device/install_check.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a plain script: the repo's packages come from the repo
    sys.path.insert(0, str(ROOT))

from tests.device import pi_check  # noqa: E402  (after the sys.path fix above)
from tests.device.pi_check import (  # noqa: E402
    SKIPPED,  # noqa: F401  (the exit code callers and tests read from here)
    WHEELHOUSE,
    Chroot,
    Failed,
    Mounts,
    Steps,
)

NAME = "edge-agent"
CHECKOUT = "/home/pi/edge-deploy"  # where a user clones the repository on a Pi
SCRATCH = "/tmp/install-check"  # in the chroot: the agent's wheel, the stubs' call log
CALLS = f"{SCRATCH}/systemd-calls.log"
STUB_DIR = "/usr/local/sbin"  # first on sudo's secure_path and on CHROOT_PATH
SUITES = ("bookworm", "trixie")
# A line install.sh prints only when it changed something (as in tests/test_install.py).
CHANGES = ("installed:", "updated:", "created:", "removed:", "enabled:", "mode ")
# What install.sh writes, snapshotted around the second run (plus the user databases).
INSTALLED = (
    "etc/edge-agent", "etc/systemd/system", "opt/edge-agent", "var/lib/edge-agent",
    "var/log/edge-agent", "etc/passwd", "etc/group", "etc/shadow", "etc/gshadow",
)  # fmt: skip
# The runtime each extra must give the agent.
RUNTIME_OF_EXTRA = {"litert": "ai_edge_litert", "tflite": "tflite_runtime"}


def systemctl_stub(unit_dir: str = "/etc/systemd/system", calls: str = CALLS) -> str:
    """install-check's systemctl (a shell script), acting on ``unit_dir``, logging to ``calls``."""
    return f"""#!/bin/sh
# install-check's systemctl: this chroot has no systemd. Every call is logged; enable,
# disable and is-enabled act on the unit's [Install] WantedBy= symlinks as systemctl does
# offline; daemon-reload, start, restart ... only log, as systemctl does in a chroot.
echo "systemctl $*" >> {calls}
dir={unit_dir}
verb=$1
[ $# -gt 0 ] && shift
unit=
for a in "$@"; do case $a in -*) ;; *) unit=$a ;; esac; done
file=$dir/$unit
wants() {{ sed -n 's/^WantedBy=//p' "$file" 2>/dev/null | tr ' ' '\\n' | sed '/^$/d'; }}
case $verb in
    enable)
        [ -f "$file" ] || {{ echo "Failed to enable unit: $unit does not exist." >&2; exit 1; }}
        for t in $(wants); do
            mkdir -p "$dir/$t.wants"
            ln -sf "$file" "$dir/$t.wants/$unit"
            echo "Created symlink $dir/$t.wants/$unit -> $file." >&2
        done ;;
    disable)
        for t in $(wants); do rm -f "$dir/$t.wants/$unit"; done ;;
    is-enabled)
        for t in $(wants); do
            [ -L "$dir/$t.wants/$unit" ] && {{ echo enabled; exit 0; }}
        done
        echo disabled; exit 1 ;;
esac
exit 0
"""


ANALYZE_STUB = f"""#!/bin/sh
# install-check's systemd-analyze: this chroot has no systemd; the call is only logged.
echo "systemd-analyze $*" >> {CALLS}
exit 0
"""

RUNTIME_PROBE = (
    "import importlib.metadata as m, json, platform, sys\n"
    "from agent.models.runtime import select_runtime\n"
    "rt = select_runtime(sys.argv[1])\n"
    "names = ['edge-deploy', 'numpy', 'ai-edge-litert', 'tflite-runtime',"
    " 'opencv-python-headless', 'tensorflow', 'tensorflow-cpu']\n"
    "v = {}\n"
    "for n in names:\n"
    "    try: v[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "cv2 = None\n"
    "if 'camera' in sys.argv[2].split(','):\n"
    "    import cv2 as c; cv2 = c.__version__\n"
    "print(json.dumps({'runtime': rt.name, 'runtime_version': rt.version, 'cv2': cv2,"
    " 'machine': platform.machine(), 'python': platform.python_version(),"
    " 'executable': sys.executable, 'packages': v}))\n"
)


def keep_shared_binfmt(binfmt_dir: Path, mounts: Mounts, report: dict[str, Any]) -> None:
    """Leave the shared binfmt_misc mounted (if we mounted it) while other checks run."""
    if binfmt_dir in mounts.mounted and (pids := pi_check.other_checks_running()):
        mounts.mounted.remove(binfmt_dir)
        report["binfmt_misc"] = f"left mounted: other checks are running ({pids})"


class Installer:
    """install.sh in the chroot, as root, offline from the wheelhouse."""

    def __init__(self, chroot: Chroot, wheel: str, log: Path) -> None:
        self.chroot = chroot
        self.wheel = wheel
        self.log = log
        self.runs = 0

    def run(self, *extra: str, timeout: float = 3600) -> tuple[int, str, str, list[str]]:
        """(exit code, stdout, stderr, systemd calls made during this run)."""
        calls = self.chroot.root / CALLS.lstrip("/")
        calls.write_text("")
        argv = self.chroot.argv(
            "/usr/bin/env", "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELHOUSE}",
            f"{CHECKOUT}/systemd/install.sh", "--from", self.wheel, *extra,
        )  # fmt: skip
        self.runs += 1
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Failed(f"install.sh run {self.runs}: timed out after {timeout:.0f}s") from e
        with self.log.open("a") as out:
            out.write(f"=== run {self.runs}: install.sh {' '.join(extra)} -> {proc.returncode}\n")
            out.write(proc.stdout + "--- stderr\n" + proc.stderr)
        return proc.returncode, proc.stdout, proc.stderr, calls.read_text().splitlines()


def copy_checkout(dest: Path) -> int:
    """The working tree as ``git clone`` would give it (tracked and untracked-not-ignored
    files), so install.sh and what it installs (unit, example config, docs) are this tree's."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    count = 0
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
            count += 1
    return count


def install_stubs(root: Path) -> dict[str, str]:
    """Stub systemctl and systemd-analyze where the chroot has none; returns what each is."""
    what = {}
    for tool, text in (("systemctl", systemctl_stub()), ("systemd-analyze", ANALYZE_STUB)):
        real = [d for d in ("usr/bin", "bin", "usr/sbin", "sbin") if (root / d / tool).exists()]
        if real:
            what[tool] = f"real (/{real[0]}/{tool})"
            continue
        stub = root / STUB_DIR.lstrip("/") / tool
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(text)
        stub.chmod(0o755)
        what[tool] = f"stub ({STUB_DIR}/{tool})"
    return what


def planned_install(chroot: Chroot, wheel: str) -> tuple[str, Path]:
    """What install.sh would pip-install here, asked of install.sh itself: a ``--root`` dry run
    with ``--no-venv`` prints the pip spec (with the extras it picks for this Python and
    machine) and copies the constraints file it picks. Returns (spec, constraints in the
    chroot's dry-run root, as a host path)."""
    dry = f"{SCRATCH}/dry-root"
    (chroot.root / dry.lstrip("/") / "etc").mkdir(parents=True)
    # install.sh picks the constraints from the OS it installs into: under --root, DIR/etc.
    release = chroot.root / "etc/os-release"  # a relative link into usr/lib: stays in the root
    if release.exists():
        shutil.copyfile(release, chroot.root / dry.lstrip("/") / "etc/os-release")
    argv = chroot.argv(f"{CHECKOUT}/systemd/install.sh", "--root", dry, "--no-venv",
                       "--no-systemctl", "--from", wheel)  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    # It ends with a failed config check (the system python has no agent): only the plan counts.
    plan = parse_plan(proc.stdout)
    if plan is None:
        raise Failed(f"install.sh --root --no-venv printed no pip plan: {proc.stdout[-400:]}"
                     f" {proc.stderr[-400:]}")  # fmt: skip
    constraints, spec = plan
    return spec, chroot.root / constraints.lstrip("/")


def parse_plan(stdout: str) -> tuple[str, str] | None:
    """(constraints path, pip spec) from install.sh's ``skipped (--no-venv): ...`` line."""
    plan = re.search(r"^skipped \(--no-venv\):.* -c (\S+) '([^']+)'$", stdout, re.M)
    return None if plan is None else (plan.group(1), plan.group(2))


def fill_wheelhouse(chroot: Chroot, spec: str, constraints: Path) -> str:
    """Make the wheelhouse hold every dependency of ``spec``: checked offline first, and only
    when something is missing (the first run, a changed pin, an extra pi-check does not
    install such as camera) downloaded from PyPI. Returns "complete" or "downloaded"."""
    inside = "/" + str(constraints.relative_to(chroot.root))
    scratch = f"{SCRATCH}/download"
    pip = ["python3", "-m", "pip", "--disable-pip-version-check", "download", "-q",
           "--only-binary=:all:", "-c", inside, "-d", scratch]  # fmt: skip
    try:
        chroot.run("pip download from the wheelhouse", *pip, "--no-index", "--find-links",
                   WHEELHOUSE, spec)  # fmt: skip
        return "complete"
    except Failed:
        chroot.run("pip download from PyPI", *pip, spec)
    # Into the shared wheelhouse, except the agent's own wheel (always this run's build).
    wheelhouse = chroot.root / WHEELHOUSE.lstrip("/")
    for whl in (chroot.root / scratch.lstrip("/")).iterdir():
        if not whl.name.startswith("edge_deploy-") and not (wheelhouse / whl.name).exists():
            shutil.copy2(whl, wheelhouse / whl.name)
    return "downloaded"


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, float]]:
    """What install.sh wrote: (content hash or link target, mode, uid, gid, mtime) per path;
    __pycache__ left out (Python may write it whenever something imports)."""
    tree = {}
    for top in INSTALLED:
        base = root / top
        paths = [base, *sorted(base.rglob("*"))] if base.is_dir() else [base]
        for path in paths:
            if "__pycache__" in path.parts or not (path.exists() or path.is_symlink()):
                continue
            st = path.lstat()
            if path.is_symlink():
                what = "-> " + os.readlink(path)
            elif path.is_file():
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = "dir"
            key = str(path.relative_to(root))
            tree[key] = (what, st.st_mode, st.st_uid, st.st_gid, st.st_mtime)
    return tree


def changes(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(CHANGES)]


def expect(problems: list[str], ok: bool, problem: str) -> None:
    if not ok:
        problems.append(problem)


def account(root: Path, name: str) -> dict[str, Any] | None:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return {"uid": int(fields[2]), "gid": int(fields[3]), "home": fields[5],
                    "shell": fields[6]}  # fmt: skip
    return None


def group_ids(root: Path) -> dict[str, tuple[int, list[str]]]:
    found = {}
    for line in (root / "etc/group").read_text().splitlines():
        name, _, gid, members = line.split(":")
        found[name] = (int(gid), [m for m in members.split(",") if m])
    return found


@contextlib.contextmanager
def without_venv_module(root: Path) -> Iterator[list[Path]]:
    """The Python without python3-venv that a fresh Debian (and a Pi OS where it was removed)
    has: the ensurepip module python3.X-venv installs is moved aside, and put back after."""
    hidden = []
    try:
        for module in sorted(root.glob("usr/lib/python3.*/ensurepip")):
            aside = module.with_name("ensurepip.hidden-by-install-check")
            module.rename(aside)
            hidden.append(module)
        yield hidden
    finally:
        for module in hidden:
            module.with_name("ensurepip.hidden-by-install-check").rename(module)


def check_without_venv_module(root: Path, code: int, out: str, err: str) -> list[str]:
    """install.sh on a Python without venv: it stops early, naming the package, and has not
    installed the unit or the config yet."""
    p: list[str] = []
    expect(p, code == 2, f"exit {code}, not 2")
    expect(p, "apt install python3-venv" in err, f"python3-venv not named: {err.strip()[-300:]}")
    for left in (f"etc/systemd/system/{NAME}.service", f"etc/{NAME}/agent.yaml"):
        expect(p, not (root / left).exists(), f"/{left} installed before the venv was made")
    return p


def check_first_run(
    root: Path, code: int, out: str, err: str, calls: list[str], report: dict[str, Any]
) -> list[str]:
    """What a fresh install must leave. Returns the problems found (empty: all good)."""
    p: list[str] = []
    if code != 0:
        return [f"install.sh exit {code}: " + " | ".join((out + err).strip().splitlines()[-10:])]
    expect(p, out.strip().endswith("edge-agent installed"), "install.sh did not end 'installed'")
    ready = re.search(r"^venv ready: (\S+) \[([^\]]*)\]$", out, re.M)
    extras = ready.group(2) if ready else ""
    report["extras"] = extras
    chosen = re.search(r"^constraints: (\S+) \(for (.*)\)$", out, re.M)  # install.sh names it
    report["constraints"] = chosen.group(1, 2) if chosen else "not named by install.sh"
    expect(p, ready is not None and ready.group(1) == f"/opt/{NAME}/venv", "no 'venv ready' line")

    # systemd: reload and enable asked for, nothing started without --start.
    report["systemd_calls"] = calls
    expect(p, "systemctl daemon-reload" in calls, f"no systemctl daemon-reload: {calls}")
    expect(p, f"systemctl enable {NAME}.service" in calls, f"no systemctl enable: {calls}")
    started = [c for c in calls if c.split()[1:2] in (["start"], ["restart"])]
    expect(p, not started, f"started without --start: {started}")

    # The unit, as shipped (install.sh substitutes nothing in it today) and enabled.
    unit = root / f"etc/systemd/system/{NAME}.service"
    shipped = (ROOT / f"systemd/{NAME}.service").read_bytes()
    expect(p, unit.is_file() and unit.read_bytes() == shipped, "unit differs from the repo's")
    expect(p, unit.is_file() and (unit.stat().st_mode & 0o777) == 0o644, "unit mode is not 644")
    wants = root / f"etc/systemd/system/multi-user.target.wants/{NAME}.service"
    expect(p, wants.is_symlink() and os.readlink(wants) == f"/etc/systemd/system/{NAME}.service",
           "not enabled: no multi-user.target.wants link")  # fmt: skip

    # The user: a system account with no login, in the unit's SupplementaryGroups=.
    user = account(root, NAME)
    report["user"] = user
    groups = group_ids(root)
    if user is None:
        p.append(f"no {NAME} user in /etc/passwd")
    else:
        expect(p, user["uid"] < 1000, f"{NAME} is not a system user (uid {user['uid']})")
        expect(p, user["home"] == f"/var/lib/{NAME}", f"home is {user['home']}")
        expect(p, user["shell"] == "/usr/sbin/nologin", f"shell is {user['shell']}")
        expect(p, groups.get(NAME, (-1, []))[0] == user["gid"], f"no {NAME} primary group")
        for g in ("video", "dialout", "plugdev"):
            expect(p, NAME in groups.get(g, (0, []))[1], f"{NAME} is not in group {g}")

    # Config and directories: root-owned, readable by the agent's group only.
    config = root / f"etc/{NAME}/agent.yaml"
    example = (ROOT / "configs/agent.example.yaml").read_bytes()
    expect(p, config.is_file() and config.read_bytes() == example, "config is not the example")
    gid = groups.get(NAME, (-1, []))[0]
    for path, mode in ((config, 0o640), (root / f"etc/{NAME}", 0o750)):
        st = path.stat() if path.exists() else None
        expect(p, st is not None and (st.st_mode & 0o777, st.st_uid, st.st_gid) == (mode, 0, gid),
               f"/{path.relative_to(root)}: not root:{NAME} {mode:o}")  # fmt: skip
    for d in (f"var/lib/{NAME}", f"var/log/{NAME}"):
        st = (root / d).stat() if (root / d).exists() else None
        uid = user["uid"] if user else -1
        expect(p, st is not None and (st.st_uid, st.st_mode & 0o777) == (uid, 0o750),
               f"/{d}: not owned by {NAME} with mode 750")  # fmt: skip
    expect(p, (root / f"opt/{NAME}/docs/operations.md").is_file(), "no docs (the unit's link)")
    return p


def check_venv(chroot: Chroot, extras: str, report: dict[str, Any]) -> list[str]:
    """The venv, as the agent's user, imports the runtime its extra promised (and OpenCV with
    camera); `edge-agent check --offline` passes on the installed config."""
    p: list[str] = []
    runtime = next((RUNTIME_OF_EXTRA[e] for e in extras.split(",") if e in RUNTIME_OF_EXTRA),
                   "auto")  # fmt: skip
    as_agent = ["runuser", "-u", NAME, "--"]
    info = json.loads(chroot.run("the venv imports its runtime", *as_agent,
                                 f"/opt/{NAME}/venv/bin/python", "-c", RUNTIME_PROBE, runtime,
                                 extras))  # fmt: skip
    report["venv"] = info
    expect(p, info["machine"] == "aarch64", f"the venv runs on {info['machine']}")
    expect(p, runtime == "auto" or info["runtime"] == runtime, f"runtime {info['runtime']}")
    expect(p, "camera" not in extras.split(",") or info["cv2"] is not None, "no OpenCV")
    tf = {"tensorflow", "tensorflow-cpu"} & set(info["packages"])
    expect(p, not tf, f"the venv pulled in TensorFlow: {sorted(tf)}")
    out = chroot.run("edge-agent check --offline", *as_agent, f"/opt/{NAME}/venv/bin/edge-agent",
                     "check", "--offline", f"/etc/{NAME}/agent.yaml")  # fmt: skip
    report["check_offline"] = out.strip()
    expect(p, " ok (device " in out, f"edge-agent check --offline said: {out.strip()}")
    return p


def check_second_run(
    before: dict[str, Any], after: dict[str, Any], out: str, calls: list[str], device: str
) -> list[str]:
    p: list[str] = []
    expect(p, changes(out) == [], f"the second run changed things: {changes(out)}")
    expect(p, f"kept: /etc/{NAME}/agent.yaml" in out, "the second run did not keep the config")
    expect(p, f"ok (device {device}," in out, "the edited config was not the one checked")
    expect(p, f"unchanged: {NAME}.service enabled" in out, "not 'unchanged: ... enabled'")
    expect(p, "systemctl daemon-reload" in calls, f"no daemon-reload on the second run: {calls}")
    expect(p, not any(c.startswith("systemctl enable") for c in calls), f"re-enabled: {calls}")
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    expect(p, not differ, f"the second run touched {differ[:8]}")
    return p


def check_uninstall(root: Path, out: str, calls: list[str], purged: bool) -> list[str]:
    """--uninstall: the service disabled and its files gone; config, state and the user kept,
    except with --purge."""
    p: list[str] = []
    expect(p, out.strip().endswith("edge-agent uninstalled"), "did not end 'uninstalled'")
    if not purged:
        expect(p, f"systemctl disable --now {NAME}.service" in calls, f"no disable: {calls}")
        expect(p, "systemctl daemon-reload" in calls, f"no daemon-reload: {calls}")
    gone = [f"etc/systemd/system/{NAME}.service", f"opt/{NAME}",
            f"etc/systemd/system/multi-user.target.wants/{NAME}.service"]  # fmt: skip
    kept = [f"etc/{NAME}/agent.yaml", f"var/lib/{NAME}", f"var/log/{NAME}"]
    if purged:
        gone, kept = gone + kept + [f"etc/{NAME}"], []
    for path in gone:
        expect(p, not (root / path).exists() and not (root / path).is_symlink(), f"/{path} left")
    for path in kept:
        expect(p, (root / path).exists(), f"/{path} removed without --purge")
    user = account(root, NAME) is not None
    expect(p, user != purged, f"user {NAME} {'left by --purge' if user else 'removed'}")
    if purged:
        members = {g: m for g, (_, m) in group_ids(root).items() if NAME in m or g == NAME}
        expect(p, not members, f"{NAME} left in /etc/group: {sorted(members)}")
    return p


def check(args: argparse.Namespace, steps: Steps, report: dict[str, Any]) -> None:
    mounts = Mounts()
    workdir = Path(tempfile.mkdtemp(prefix="install-check-", dir=args.workdir))
    root = workdir / "rootfs"
    report["workdir"] = str(workdir)
    failed = True
    try:
        with steps.step("host_setup"):
            pi_check.ensure_binfmt_mounted(args.binfmt_dir, mounts)
            report["installed"] = pi_check.ensure_host_tools()
            pi_check.enable_qemu_aarch64(args.binfmt_dir)
            pi_check.hold_binfmt(workdir, mounts)
        with steps.step("rootfs"):
            hit = pi_check.rootfs_from_cache(root, args.cache, args.suite)
            report["rootfs_cache"] = "hit" if hit else "miss"
        chroot = Chroot(root, args.qemu_cpu)
        with steps.step("chroot_setup"):
            machine = pi_check.prepare_chroot(
                chroot, mounts, workdir, args.cache / f"wheels-{args.suite}-{pi_check.ARCH}"
            )
            if machine != "aarch64":
                raise Failed(f"the chroot runs as {machine}, not aarch64")
            report["checkout_files"] = copy_checkout(root / CHECKOUT.lstrip("/"))
            (root / SCRATCH.lstrip("/")).mkdir(parents=True)
            report["systemd"] = install_stubs(root)
        with steps.step("wheel"):
            built = pi_check.build_wheel(workdir / "wheel")
            wheel = f"{SCRATCH}/{built.name}"
            shutil.copy2(built, root / wheel.lstrip("/"))
        with steps.step("wheelhouse"):
            spec, constraints = planned_install(chroot, wheel)
            report["planned"] = {"spec": spec.replace(wheel, "<wheel>"),
                                 "constraints": constraints.read_text().count("==")}  # fmt: skip
            report["wheelhouse"] = fill_wheelhouse(chroot, spec, constraints)
        installer = Installer(chroot, wheel, workdir / "install.log")
        # The documented first step, `apt install python3-venv`, forgotten: install.sh must
        # stop naming it, and the next run (package installed) must make the venv anew.
        with steps.step("install_without_venv_module"), without_venv_module(root) as hidden:
            if not hidden:
                raise Failed("no ensurepip module in the rootfs (is python3-venv in it?)")
            code, out, err, _ = installer.run()
        problems = check_without_venv_module(root, code, out, err)
        if problems:
            raise Failed("without python3-venv: " + "; ".join(problems))
        with steps.step("install"):
            code, out, err, calls = installer.run()
        problems = check_first_run(root, code, out, err, calls, report)
        expect(problems, f"created: /opt/{NAME}/venv (" in out, "the half-made venv was kept")
        if code == 0:
            with steps.step("venv_check"):
                problems += check_venv(chroot, report.get("extras", ""), report)
        if problems:
            raise Failed("first run: " + "; ".join(problems))

        # An operator edits the config; the second run must keep it and change nothing.
        config = root / f"etc/{NAME}/agent.yaml"
        device = "pi-install-check-02"
        config.write_text(config.read_text().replace("pi-kitchen-01", device))
        before = snapshot(root)
        with steps.step("install_again"):
            code, out, err, calls = installer.run()
        if code != 0:
            raise Failed(f"second run: install.sh exit {code}: "
                         + " | ".join((out + err).strip().splitlines()[-10:]))  # fmt: skip
        report["second_run_calls"] = calls
        problems = check_second_run(before, snapshot(root), out, calls, device)
        if problems:
            raise Failed("second run: " + "; ".join(problems))

        with steps.step("uninstall"):
            for flags in (["--uninstall"], ["--uninstall", "--purge"]):
                code, out, err, calls = installer.run(*flags)
                what = " ".join(flags)
                if code != 0:
                    raise Failed(f"{what}: exit {code}: " + " | ".join(
                        (out + err).strip().splitlines()[-6:]))  # fmt: skip
                problems = check_uninstall(root, out, calls, purged="--purge" in flags)
                if problems:
                    raise Failed(f"{what}: " + "; ".join(problems))
                report[f"calls_{what.replace('--', '').replace(' ', '_')}"] = calls
        failed = False
    finally:
        with steps.step("cleanup"):
            log = workdir / "install.log"
            if failed and log.is_file():
                tail = log.read_text(errors="replace").strip().splitlines()[-30:]
                print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            keep_shared_binfmt(args.binfmt_dir, mounts, report)
            stuck = mounts.unmount_all(root)
            if stuck or pi_check.mounted_under(workdir):
                still = stuck or pi_check.mounted_under(workdir)
                report["cleanup"] = f"still mounted, {workdir} kept: {still}"
            elif args.keep:
                report["cleanup"] = f"kept {workdir}"
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="install-check", description=__doc__.splitlines()[0])
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="bookworm",
        help="Debian suite of the rootfs: bookworm (Pi OS 12) or trixie (Pi OS 13)",
    )
    p.add_argument(
        "--qemu-cpu",
        choices=pi_check.QEMU_CPUS,
        default="cortex-a72",
        help="emulated CPU: cortex-a72 (Pi 4, default) or cortex-a76 (Pi 5)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=pi_check.cache_dir(),
        help="pi-check's rootfs tarball and arm64 wheelhouse (~/.cache/edge-deploy)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory")
    p.add_argument("--binfmt-dir", type=Path, default=Path("/proc/sys/fs/binfmt_misc"))
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return pi_check.run_reported("install-check", parse_args(argv), check)


if __name__ == "__main__":
    sys.exit(main())
