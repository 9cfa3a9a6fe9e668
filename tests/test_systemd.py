"""The unit file passes systemd's own checks, and the agent's notify messages arrive."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ops.sdnotify import Notifier, watchdog_interval_s

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
for name in ("ai_edge_litert", "tflite_runtime"):
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
        [sys.executable, "-c", MDWE_PROBE, str(tiny_int8_model)],
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
