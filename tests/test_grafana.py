"""The agent's Grafana dashboard (docs/grafana/agent.json) queries only metrics the code
exports: names and labels come from the real exporter's output on a full telemetry
snapshot, so a renamed metric fails here (the fleet server's: tests/server)."""

from __future__ import annotations

import time

from agent.models.health import QUANTILES
from agent.ops.metrics import MetricsExporter
from agent.protocol import PipelineTelemetry, StageLatency, Telemetry
from tests.grafana_support import check, exported


def test_agent_dashboard_names_only_exported_metrics() -> None:
    stages = {s: StageLatency(p50=1.0, p95=2.0, p99=3.0) for s in ("wait", "invoke")}
    telemetry = Telemetry(
        device="pi-1", seq=1, ts=time.time(), uptime_s=10, cpu_percent=5, mem_rss_mb=80,
        load_1m=0.5, temperature_c=50, disk_free_mb=900,
        pipelines={"cam": PipelineTelemetry(model="digits", version="1", fps=9.5, stages=stages,
                                            drift=0.02, confidence=[0.5] * len(QUANTILES))},
    )  # fmt: skip
    outbox = {"depth": 1, "accepted": 3, "published": 2, "refused": 0, "write_errors": 0,
              "dropped": {"results": 0, "telemetry": 0}}  # fmt: skip
    body, _ = MetricsExporter(lambda: telemetry, lambda: outbox).render()
    metrics = exported(body.decode())
    used = check("agent.json", metrics)
    # The panels the dashboard promises: fps, stage latencies, drops, errors, outbox,
    # drift, model versions.
    assert {
        "edge_agent_pipeline_fps",
        "edge_agent_pipeline_stage_latency_seconds",
        "edge_agent_pipeline_dropped_frames_total",
        "edge_agent_pipeline_errors_total",
        "edge_agent_outbox_depth",
        "edge_agent_pipeline_drift_psi",
        "edge_agent_pipeline_model_info",
    } <= used
