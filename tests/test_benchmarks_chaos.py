"""The chaos benchmark's harness works end to end (one scenario), and its fuzz corpus is
what it says. Not a timed test: the figures of a full run are the benchmark's business."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.chaos import fuzz_payloads

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = (
    "lost",
    "uncounted_drops",
    "thread_deaths",
    "unanswered_commands",
    "unproven_active_after_crash",
    "leftover_files",
    "sigterm_s_max",
    "fuzz_payloads",
    "rss_growth_mb_fuzz",
)


def test_fuzz_corpus_is_deterministic_and_holds_the_known_killer() -> None:
    manifest = {"name": "digits", "version": "2"}
    payloads = fuzz_payloads(300, 14, manifest)
    assert len(payloads) == 300
    assert payloads == fuzz_payloads(300, 14, manifest)
    assert b"[" * 2000 in payloads  # the payload that silenced a group (issue 14)
    assert any(len(p) > 256 * 1024 for p in payloads)  # over the command limit
    # Mostly distinct; some are resent on purpose (reused ids).
    assert len(set(payloads)) > 150


@pytest.mark.slow
def test_agent_kill_scenario_runs_and_accounts_every_seq(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--quick", "--json", "--only", "agent_kill"],
        capture_output=True, text=True, timeout=280, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(REQUIRED) <= set(report)
    scenario = report["scenarios"]["agent_kill"]
    assert report["complete"] and report["errors"] == [], scenario
    # The stream really ran across the kill, and the accounting saw all of it.
    assert scenario["cutoff_from"] == "status"
    assert scenario["cutoff_seq"] > 50
    assert scenario["received_distinct"] >= scenario["cutoff_seq"]
    assert scenario["lost"] == 0 and report["lost"] == 0
    assert scenario["uncounted_drops"] == 0
    assert scenario["thread_deaths"] == 0
