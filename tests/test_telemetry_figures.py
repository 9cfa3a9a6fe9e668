from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from agent.loops.stats import LatencyWindow, RateMeter
from agent.ops.telemetry import DeviceSampler, rss_mb, temperature_c


def test_latency_window_percentiles_over_the_last_values() -> None:
    w = LatencyWindow(size=100)
    assert w.percentiles(50) == [None]
    for v in range(1000):
        w.add(float(v))
    p50, p95 = w.percentiles(50, 95)
    assert w.count == 1000
    assert p50 == np.percentile(np.arange(900, 1000), 50)
    assert p95 is not None and 990 < p95 < 1000


def test_rate_meter() -> None:
    m = RateMeter()
    assert m.rate(0, 10.0) == 0.0
    assert m.rate(50, 12.0) == 25.0


def test_temperature_from_thermal_zones(tmp_path: Path) -> None:
    for i, milli in enumerate(["45000", "61250", "garbage"]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(milli + "\n")
    assert temperature_c(str(tmp_path / "thermal_zone*/temp")) == 61.2
    assert temperature_c(str(tmp_path / "none*/temp")) is None


def test_device_sampler_reports_real_figures(tmp_path: Path) -> None:
    sampler = DeviceSampler(tmp_path, thermal_glob=str(tmp_path / "none"))
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn some CPU so the percentage is not zero
        pass
    figures = sampler.sample()
    assert figures.cpu_percent is not None and figures.cpu_percent > 0
    assert figures.mem_rss_mb == rss_mb() or abs((figures.mem_rss_mb or 0) - (rss_mb() or 0)) < 5
    assert figures.disk_free_mb is not None and figures.disk_free_mb > 0
    assert figures.temperature_c is None


def test_reporter_carries_outbox_depth_and_drops(tmp_path: Path) -> None:
    from agent.ops.telemetry import TelemetryReporter
    from agent.protocol import PipelineTelemetry

    reporter = TelemetryReporter(
        "pi-1",
        DeviceSampler(tmp_path, thermal_glob=str(tmp_path / "none")),
        lambda now: {"cam": PipelineTelemetry(frames_in=3)},
        lambda: {"depth": 7, "dropped": {"telemetry": 2, "results": 1, "intake": 0}},
    )
    t = reporter.build()
    assert (t.outbox_depth, t.outbox_dropped) == (7, 3)
    assert t.pipelines["cam"].frames_in == 3 and t.device == "pi-1"
