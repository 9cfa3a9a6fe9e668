"""The unit file passes systemd's own checks, and the agent's notify messages arrive."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from agent.models.store import ModelStore
from agent.ops.sdnotify import Notifier, watchdog_interval_s
from agent.threads import SYSCALLS
from tests.device_venv import DEVICE_RUNTIMES
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd/edge-agent.service"
ANALYZE = shutil.which("systemd-analyze")


def unit_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart's binary exists; point it at one that does.
    text = UNIT.read_text().replace("/opt/edge-agent/venv/bin/edge-agent", sys.executable)
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text)
    return copy


def test_unit_has_what_the_agent_relies_on() -> None:
    text = UNIT.read_text()
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=edge-agent",
        "SupplementaryGroups=video dialout",
        "MemoryDenyWriteExecute=yes",
    ]:
        assert line in text


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ANALYZE), "verify", str(unit_copy(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "edge-agent.service" not in result.stderr, result.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ANALYZE), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    line = next(ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 2.5, line


MDWE_PROBE = """
import ctypes, sys
import numpy as np
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("no-mdwe"); sys.exit(0)
for name in sys.argv[2:]:
    mod = __import__(name + ".interpreter", fromlist=["Interpreter"])
    it = mod.Interpreter(model_path=sys.argv[1], num_threads=2)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
import cv2
print("ok")
"""


def test_runtimes_work_with_memory_deny_write_execute(tiny_int8_model: Path) -> None:
    """What MemoryDenyWriteExecute=yes enforces, applied with prctl(PR_SET_MDWE)."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE, str(tiny_int8_model), *DEVICE_RUNTIMES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"


def test_notifier_sends_each_message(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    n = Notifier(str(path))
    try:
        assert n.ready("serving 1 pipeline")
        assert server.recv(1024) == b"READY=1\nSTATUS=serving 1 pipeline"
        assert n.watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"
        assert n.status("two\nlines")
        assert server.recv(1024) == b"STATUS=two"
        assert n.stopping()
        assert server.recv(1024) == b"STOPPING=1"
    finally:
        n.close()
        server.close()


def test_notifier_without_socket_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready() and not n.watchdog()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_s() is None


# ------------------------------------------------------------- the syscall filter

# Which of the groups the unit names hold each of the agent's syscalls (systemd 252),
# for machines without systemd-analyze; where it exists, the test checks this table.
GROUPS_OF = {
    "getpriority": {"@system-service"},
    "setpriority": {"@resources", "@system-service"},
    "prlimit64": {"@default", "@system-service"},
    "prctl": {"@process", "@system-service"},
}


def filter_lines(unit: Path = UNIT) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.startswith("SystemCallFilter=")
    ]


def analyze_group(group: str) -> set[str]:
    """Every syscall in ``group``, nested groups expanded, as systemd-analyze lists it."""
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines():
        item = line.strip()
        if not line.startswith(" ") or not item or item.startswith("#"):
            continue
        names |= analyze_group(item) if item.startswith("@") else {item}
    return names


def allowed_by(lines: list[str], expand: Callable[[str], set[str]], syscall: str) -> bool:
    """systemd.exec: the first SystemCallFilter= line decides allow-list or deny-list;
    each later one adds to or takes from that set, in order."""
    allow_list: bool | None = None
    names: set[str] = set()
    for value in lines:
        deny = value.startswith("~")
        items: set[str] = set()
        for item in value.lstrip("~").split():
            items |= expand(item)
        if allow_list is None:
            allow_list, names = not deny, items
        elif allow_list != deny:
            names |= items
        else:
            names -= items
    if allow_list is None:
        return True
    return (syscall in names) == allow_list


def table_expand(item: str) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return {name for name, groups in GROUPS_OF.items() if item in groups}


def test_the_unit_allows_every_syscall_the_agent_uses() -> None:
    lines = filter_lines()
    assert lines, "the unit has no SystemCallFilter"
    assert set(GROUPS_OF) == set(SYSCALLS)
    refused = [s for s in SYSCALLS if not allowed_by(lines, table_expand, s)]
    assert refused == [], f"SystemCallFilter refuses {refused}"


def test_the_filter_reading_is_right() -> None:
    # The reading above, on what the unit used to say: setpriority refused.
    old = ["@system-service", "~@privileged @resources"]
    assert not allowed_by(old, table_expand, "setpriority")
    assert allowed_by(old, table_expand, "getpriority")
    assert allowed_by([*old, "setpriority"], table_expand, "setpriority")
    assert not allowed_by(["~@resources"], table_expand, "setpriority")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_the_group_table_matches_systemd_analyze() -> None:
    groups = {g for line in filter_lines() for g in line.lstrip("~").split() if g[0] == "@"}
    groups |= {g for named in GROUPS_OF.values() for g in named}
    members = {g: analyze_group(g) for g in groups}
    for syscall in SYSCALLS:
        assert {g for g in groups if syscall in members[g]} == GROUPS_OF[syscall], syscall
    # And the unit, read with systemd's own tables, agrees.
    lines = filter_lines()
    refused = [s for s in SYSCALLS if not allowed_by(lines, lambda i: members.get(i, {i}), s)]
    assert refused == []


STRACE = shutil.which("strace")
# Made by libraries under the agent and refused by the unit on purpose (EPERM), with
# why that is harmless.
REFUSED_AND_HARMLESS = {
    # OpenBLAS (numpy's) asks for NUMA placement of its buffers; it ignores a refusal.
    "mbind": "@resources",
}


def ptrace_allowed() -> bool:
    if STRACE is None:
        return False
    probe = subprocess.run([STRACE, "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(
    ANALYZE is None or not ptrace_allowed(), reason="needs systemd-analyze and strace"
)
def test_the_running_agent_makes_no_syscall_the_unit_refuses(
    tmp_path: Path, broker: Broker, tiny_int8_model: Path
) -> None:
    """The whole agent under strace: start-up (with the validation child), serving a
    model on a camera, publishing, stopping. Every syscall it made must pass the unit's
    filter, read with systemd's own tables."""
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(manifest_for(tiny_int8_model, name="tiny"), None, tiny_int8_model)
    store.set_active("tiny", "1")
    config = {
        "device": {"id": "pi-strace"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "strace-test"},
        "models": {"require_signature": False},
        "pipelines": [
            {"name": "cam", "model": "tiny", "queue": "fifo",
             "source": {"type": "synthetic", "width": 8, "height": 8, "channels": 1,
                        "fps": 20}},
        ],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    results = MessageCollector(broker, "strace-test/pi-strace/results/#")
    summary = tmp_path / "strace.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [STRACE or "strace", "-f", "-qq", "-c", "-o", str(summary),
         sys.executable, "-m", "agent", "run", str(path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        results.wait_for(5, timeout=120)
    finally:
        results.close()
        # The agent is strace's child: it gets the SIGTERM, as under systemd.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err[-2000:]
    used = {
        line.split()[-1]
        for line in summary.read_text().splitlines()
        if line.strip() and line.split()[-1].isidentifier()
    } - {"syscall", "total"}
    assert {"setpriority", "read", "write"} <= used  # the summary was read right
    groups = {g for line in filter_lines() for g in line.lstrip("~").split() if g[0] == "@"}
    members = {g: analyze_group(g) for g in groups}
    lines = filter_lines()
    refused = {s for s in used if not allowed_by(lines, lambda i: members.get(i, {i}), s)}
    harmless = set(REFUSED_AND_HARMLESS)
    if os.geteuid() == 0:
        harmless.add("fchown")  # SQLite gives its WAL files the database's owner as root only
    assert refused - harmless == set(), f"the unit refuses syscalls the agent made: {refused}"
