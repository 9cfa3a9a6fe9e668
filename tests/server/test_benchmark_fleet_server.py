"""The fleet server benchmark's harness works end to end on a tiny fleet: a real server
process, the simulated devices, a rollout, and every telemetry message accounted for.
Not a timed test: the figures of a real run are the benchmark's business."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "devices",
    "telemetry_msgs_per_s",
    "offered_msgs_per_s",
    "sent",
    "ingested",
    "lost",
    "reconcile_s",
    "all_reached",
    "deploys_run",
    "api_p95_ms",
    "api_p95_ms_at_offered",
    "server_rss_mb",
)


def test_a_tiny_run_on_sqlite_reports_every_figure_and_loses_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.fleet_server", "--json", "--db", "sqlite",
            "--devices", "20", "--duration", "2", "--rate", "100",
        ],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "fleet_server"
    assert report["complete"] and report["errors"] == [], report
    run = report["sqlite"]
    assert set(FIGURES) <= set(run), sorted(set(FIGURES) - set(run))
    assert run["devices"] == 20
    # Telemetry really flowed, and every message sent is in the database.
    assert run["sent"] > 20 and run["lost"] == 0 and run["ingested"] == run["sent"]
    # Every device was deployed to once, and the server saw them all on the version.
    assert run["all_reached"] and run["reached_api"] == 20 and run["deploys_run"] == 20
    assert run["rollout_state"] == "done"
    assert run["api_errors"] == 0 and run["api_ms"]["devices"]["count"] > 0
    assert run["server_rss_mb"] > 0
    assert report["targets"]["nothing_lost"] is True
    # The temp dir (server data, broker, bundle) is removed.
    assert not list(tmp_path.glob("bench-fleet-server-*"))
