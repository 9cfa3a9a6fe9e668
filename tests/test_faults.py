"""The fault-injection seam that crash tests rely on kills exactly where it is told to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from agent.ops.faults import _parse

SCRIPT = (
    "from agent.ops import faults\n"
    "faults.at_stage('downloading', 10.0)\n"
    "faults.at_stage('validating', None)\n"
    "faults.at_stage('downloading', 60.0)\n"
    "print('survived')\n"
)


def run(kill_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_KILL_AT"}
    if kill_at is not None:
        env["EDGE_AGENT_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("kill_at", ["validating", "downloading@50", "installing,downloading"])
def test_kills_at_the_chosen_point(kill_at: str) -> None:
    done = run(kill_at)
    assert done.returncode == -signal.SIGKILL
    assert "survived" not in done.stdout


@pytest.mark.parametrize("kill_at", [None, "", "swapping", "downloading@90"])
def test_does_nothing_elsewhere(kill_at: str | None) -> None:
    done = run(kill_at)
    assert done.returncode == 0 and "survived" in done.stdout


def test_parse() -> None:
    assert _parse("a, b@50 ,c@x") == {"a": 0.0, "b": 50.0, "c": 0.0}
