"""Agent start-up: process start to READY, to the first result, and idle memory, per runtime.

    python -m benchmarks.startup [--quick] [--json]

For each installed TFLite runtime (``runtime.prefer``: ai_edge_litert,
tflite_runtime), ``python -m agent run`` starts with a converter-built digits model
already in its store (active, last-known-good), a synthetic source at 10 fps and a
private Mosquitto, under a fake systemd ``NOTIFY_SOCKET``. Figures, the median of
the runs (1 with ``--quick``, 5 otherwise):

- ``ready_s``: ``Popen`` to ``READY=1`` on the notify socket;
- ``first_result_s``: ``Popen`` to the first result on the broker (start-up
  recovery loads and validates the stored model first);
- ``idle_rss_mb``: VmRSS of the agent 5 s after its first result, serving, no
  command running;
- ``stop_s``: SIGTERM to exit;
- ``runtime_reported``: the runtime the agent's retained state names.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._agent_harness import (
    AgentProcess,
    NotifySocket,
    Observer,
    agent_config,
    digits_bundles,
    preinstall,
    wait_until,
)
from tests.mqtt_support import Broker

RUNTIMES = ("ai_edge_litert", "tflite_runtime")
FPS = 10.0
IDLE_AFTER_S = 5.0
TIMEOUT_S = 120.0


def installed(runtime: str) -> bool:
    try:
        return importlib.util.find_spec(f"{runtime}.interpreter") is not None
    except ModuleNotFoundError:
        return False


def one_start(
    work: Path, broker: Broker, observer: Observer, bundle: Path, runtime: str, run: int
) -> dict[str, Any]:
    device = f"startup-{runtime.replace('_', '-')}-{run}"
    workdir = work / device
    preinstall(workdir / "state", bundle)
    config = agent_config(workdir, device, broker, fps=FPS, prefer=runtime)
    notify = NotifySocket(workdir / "notify.sock")
    agent = AgentProcess(config, workdir / "agent.log")
    try:
        started = time.time()
        agent.start({"NOTIFY_SOCKET": str(notify.path)})
        if not wait_until(lambda: notify.first("READY=1") is not None, TIMEOUT_S):
            raise RuntimeError(f"no READY=1 within {TIMEOUT_S:.0f}s: {agent.log_text()[-800:]}")
        if not wait_until(lambda: observer.device(device).first_result_at is not None, TIMEOUT_S):
            raise RuntimeError(f"no result within {TIMEOUT_S:.0f}s: {agent.log_text()[-800:]}")
        ready = notify.first("READY=1")
        first = observer.device(device).first_result_at
        assert ready is not None and first is not None
        time.sleep(IDLE_AFTER_S)
        rss = agent.rss_mb()
        state = observer.last_state(device) or {}
        stopping = time.monotonic()
        agent.terminate()
        code = agent.wait(30)
        return {
            "ready_s": round(ready - started, 3),
            "first_result_s": round(first - started, 3),
            "idle_rss_mb": round(rss, 1) if rss is not None else None,
            "stop_s": round(time.monotonic() - stopping, 2) if code is not None else None,
            "exit": code,
            "runtime_reported": (state.get("runtime") or {}).get("name"),
        }
    finally:
        agent.close()
        notify.close()


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 3) if values else None


def run(quick: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    repeats = 1 if quick else 5
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    broker = Broker(work / "mosquitto")
    observer: Observer | None = None
    report: dict[str, Any] = {"benchmark": "startup", "quick": quick, "fps": FPS}
    per_runtime: dict[str, Any] = {}
    try:
        bundle = digits_bundles(("1",))["1"]
        broker.start()
        observer = Observer(broker)
        for runtime in RUNTIMES:
            if not installed(runtime):
                per_runtime[runtime] = {"installed": False}
                continue
            runs: list[dict[str, Any]] = []
            for i in range(repeats):
                try:
                    runs.append(one_start(work, broker, observer, bundle, runtime, i))
                except Exception as exc:
                    runs.append({"error": f"{type(exc).__name__}: {exc}"[:1500]})
            per_runtime[runtime] = {
                "installed": True,
                **{k: median(runs, k) for k in ("ready_s", "first_result_s", "idle_rss_mb")},
                "stop_s": median(runs, "stop_s"),
                "runtime_reported": sorted({str(r.get("runtime_reported")) for r in runs}),
                "runs": runs,
            }
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        if observer is not None:
            observer.close()
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)
    measured = [r for r in per_runtime.values() if r.get("installed")]
    for key in ("ready_s", "first_result_s", "idle_rss_mb"):
        values = [r[key] for r in measured if r.get(key) is not None]
        report[f"{key}_max"] = max(values) if values else None
    report["errors"] = sorted(
        name for name, r in per_runtime.items() if any("error" in x for x in r.get("runs", []))
    )
    report["runtimes"] = per_runtime
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one start per runtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = run(args.quick)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
