"""The telemetry figures in Prometheus' text format, for ``GET /metrics`` on the local API.

The same figures as the telemetry messages, from the same sources: the device
(uptime, CPU, memory, load, temperature, free disk), the outbox (depth, published,
drops) and each pipeline (rates, counters, stage latency percentiles, the model
version it serves, its source's state, its output drift and confidence quantiles).
prometheus-client is optional (the ``metrics`` extra): it is imported when a scrape
renders, so the agent imports and runs without it, and a scrape then gets one clear
line saying what to install.

Latencies are in seconds and sizes in bytes, as Prometheus names want; counters
end in ``_total``. The model version and the source state are labels of ``1``-valued
series, so that a swap or a reconnect is one query away
(``edge_agent_pipeline_model_info``, ``edge_agent_pipeline_source_state``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agent.models.health import QUANTILES
from agent.protocol import Telemetry

logger = logging.getLogger(__name__)

SOURCE_STATES = ("opening", "open", "reconnecting", "ended", "stopped")
INSTALL_HINT = (
    "http.metrics is on but prometheus-client is not installed: "
    "pip install 'edge-deploy[metrics]' (or set http.metrics: false)"
)


class MetricsUnavailable(RuntimeError):
    """prometheus-client is missing."""


def metrics_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


class MetricsExporter:
    """Renders ``telemetry()`` (a Telemetry message built for this scrape) and
    ``outbox()`` (the outbox's stats) as one exposition."""

    def __init__(
        self,
        telemetry: Callable[[], Telemetry],
        outbox: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._outbox = outbox

    def render(self) -> tuple[bytes, str]:
        """(body, content type); raises MetricsUnavailable without prometheus-client."""
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise MetricsUnavailable(INSTALL_HINT) from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self._telemetry(), self._outbox() if self._outbox else None))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, telemetry: Telemetry, outbox: Mapping[str, Any] | None) -> None:
        self.t = telemetry
        self.outbox = outbox

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        t = self.t

        def gauge(name: str, doc: str, value: float | None, scale: float = 1.0) -> Iterator[Any]:
            if value is not None:
                yield GaugeMetricFamily(f"edge_agent_{name}", doc, value=value * scale)

        info = GaugeMetricFamily(
            "edge_agent_info", "The device this agent runs as", labels=["device"]
        )
        info.add_metric([t.device], 1)
        yield info
        yield from gauge("uptime_seconds", "Seconds since the agent started", t.uptime_s)
        yield from gauge("cpu_percent", "CPU use of the agent process", t.cpu_percent)
        yield from gauge("resident_memory_bytes", "Resident memory", t.mem_rss_mb, 2**20)
        yield from gauge("load1", "Load average over 1 minute", t.load_1m)
        yield from gauge("temperature_celsius", "Hottest thermal zone", t.temperature_c)
        yield from gauge(
            "disk_free_bytes", "Free disk in the state directory", t.disk_free_mb, 2**20
        )
        yield CounterMetricFamily(
            "edge_agent_thread_deaths",
            "Agent threads that died unexpectedly since the agent started",
            value=t.thread_deaths,
        )
        yield from gauge(
            "threads_down",
            "Agent threads dead or stuck now (no watchdog pings)",
            len(t.threads_down),
        )
        # From the outbox's own figures when there are, so that they add up in one scrape.
        depth = t.outbox_depth if self.outbox is None else self.outbox.get("depth", 0)
        yield from gauge("outbox_depth", "Messages waiting in the outbox", depth)
        if self.outbox is not None:
            # accepted_total == published_total + sum(dropped_total) + outbox_depth
            yield CounterMetricFamily(
                "edge_agent_outbox_accepted",
                "Messages the outbox accepted",
                value=self.outbox.get("accepted", 0),
            )
            yield CounterMetricFamily(
                "edge_agent_outbox_published",
                "Messages the broker acknowledged",
                value=self.outbox.get("published", 0),
            )
            yield CounterMetricFamily(
                "edge_agent_outbox_refused",
                "Messages not accepted (stopping, or too many in memory)",
                value=self.outbox.get("refused", 0),
            )
            yield CounterMetricFamily(
                "edge_agent_outbox_write_errors",
                "Failed outbox writes (a full disk); their messages are kept and retried",
                value=self.outbox.get("write_errors", 0),
            )
            dropped = CounterMetricFamily(
                "edge_agent_outbox_dropped",
                "Accepted messages dropped by the outbox, by reason",
                labels=["kind"],
            )
            for kind, count in sorted(self.outbox.get("dropped", {}).items()):
                dropped.add_metric([kind], count)
            yield dropped
        yield from self._pipelines()

    def _pipelines(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        label = ["pipeline"]
        model = GaugeMetricFamily(
            "edge_agent_pipeline_model_info",
            "The model version a pipeline serves (version empty: none)",
            labels=["pipeline", "model", "version"],
        )
        source = GaugeMetricFamily(
            "edge_agent_pipeline_source_state",
            "1 for the state the pipeline's source is in",
            labels=["pipeline", "state"],
        )
        fps = GaugeMetricFamily(
            "edge_agent_pipeline_fps", "Frames inferred per second", labels=label
        )
        counters = {
            "frames_in": CounterMetricFamily(
                "edge_agent_pipeline_frames_in", "Frames read from the source", labels=label
            ),
            "results_out": CounterMetricFamily(
                "edge_agent_pipeline_results_out", "Results handed to the outbox", labels=label
            ),
            "dropped": CounterMetricFamily(
                "edge_agent_pipeline_dropped_frames", "Stale frames dropped unseen", labels=label
            ),
            "errors": CounterMetricFamily(
                "edge_agent_pipeline_errors",
                "Failed inferences of the served version",
                labels=label,
            ),
            "source_failures": CounterMetricFamily(
                "edge_agent_pipeline_source_failures", "Times the source failed", labels=label
            ),
            "capture_errors": CounterMetricFamily(
                "edge_agent_pipeline_capture_errors",
                "Frames worth labelling that could not be written",
                labels=label,
            ),
        }
        captured = GaugeMetricFamily(
            "edge_agent_pipeline_captured", "Frames kept for labelling now", labels=label
        )
        latency = GaugeMetricFamily(
            "edge_agent_pipeline_stage_latency_seconds",
            "Latency of each stage over the last frames, by quantile",
            labels=["pipeline", "stage", "quantile"],
        )
        drift = GaugeMetricFamily(
            "edge_agent_pipeline_drift_psi",
            "PSI of the window's outputs against the served model's reference statistics",
            labels=label,
        )
        confidence = GaugeMetricFamily(
            "edge_agent_pipeline_confidence",
            "Top-1 confidence (classify) or detection scores (detect) over the window, by quantile",
            labels=["pipeline", "quantile"],
        )
        for name, p in sorted(self.t.pipelines.items()):
            model.add_metric([name, p.model or "", p.version or ""], 1)
            for state in SOURCE_STATES:
                source.add_metric([name, state], 1 if p.source_state == state else 0)
            fps.add_metric([name], p.fps)
            captured.add_metric([name], p.captured)
            for key, family in counters.items():
                family.add_metric([name], getattr(p, key))
            for stage, s in p.stages.items():
                for q, ms in (("0.5", s.p50), ("0.95", s.p95), ("0.99", s.p99)):
                    if ms is not None:
                        latency.add_metric([name, stage, q], ms / 1000)
            if p.drift is not None:
                drift.add_metric([name], p.drift)
            for level, score in zip(QUANTILES, p.confidence or [], strict=False):
                confidence.add_metric([name, f"{level:g}"], score)
        yield model
        yield source
        yield fps
        yield captured
        yield from counters.values()
        yield latency
        yield drift
        yield confidence
