"""Device figures for telemetry: CPU, memory, load, temperature, disk, uptime.

Read from /proc and /sys, which the Raspberry Pi and Jetson kernels both expose;
every figure is optional, so a missing file makes it None, never an error.
"""

from __future__ import annotations

import glob
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol import PipelineTelemetry, Telemetry

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float | None:
    """Resident memory of this process now (not the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * _PAGE / 2**20, 1)
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / 1024, 1)


def temperature_c(pattern: str = "/sys/class/thermal/thermal_zone*/temp") -> float | None:
    """The hottest thermal zone, in degrees Celsius."""
    best: float | None = None
    for path in glob.glob(pattern):
        try:
            value = int(Path(path).read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if -40 < value < 150 and (best is None or value > best):
            best = value
    return None if best is None else round(best, 1)


@dataclass
class DeviceFigures:
    uptime_s: float
    cpu_percent: float | None
    mem_rss_mb: float | None
    load_1m: float | None
    temperature_c: float | None
    disk_free_mb: float | None


class DeviceSampler:
    """CPU percent of this process between two samples, and the device's other figures."""

    def __init__(
        self, state_dir: Path, thermal_glob: str = "/sys/class/thermal/thermal_zone*/temp"
    ):
        self.state_dir = state_dir
        self.thermal_glob = thermal_glob
        self.started = time.monotonic()
        self._last_cpu = time.process_time()
        self._last_wall = time.monotonic()

    def sample(self) -> DeviceFigures:
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._last_wall
        cpu_percent = round(100.0 * (cpu - self._last_cpu) / wall, 1) if wall > 0 else None
        self._last_cpu, self._last_wall = cpu, now
        try:
            disk = round(shutil.disk_usage(self.state_dir).free / 2**20, 1)
        except OSError:
            disk = None
        try:
            load = round(os.getloadavg()[0], 2)
        except OSError:
            load = None
        return DeviceFigures(
            uptime_s=round(now - self.started, 1),
            cpu_percent=cpu_percent,
            mem_rss_mb=rss_mb(),
            load_1m=load,
            temperature_c=temperature_c(self.thermal_glob),
            disk_free_mb=disk,
        )


class TelemetryReporter:
    """Builds a ``Telemetry`` message from the device figures and each pipeline's own."""

    def __init__(
        self,
        device: str,
        sampler: DeviceSampler,
        pipelines: Callable[[float], dict[str, PipelineTelemetry]],
        outbox_stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.device = device
        self.sampler = sampler
        self.pipelines = pipelines
        self.outbox_stats = outbox_stats

    def build(self) -> Telemetry:
        figures = self.sampler.sample()
        outbox = self.outbox_stats()
        now = time.time()
        return Telemetry(
            device=self.device,
            seq=0,  # the outbox assigns the per-device sequence number
            ts=now,
            uptime_s=figures.uptime_s,
            cpu_percent=figures.cpu_percent,
            mem_rss_mb=figures.mem_rss_mb,
            load_1m=figures.load_1m,
            temperature_c=figures.temperature_c,
            disk_free_mb=figures.disk_free_mb,
            outbox_depth=int(outbox.get("depth", 0)),
            outbox_dropped=sum(int(n) for n in outbox.get("dropped", {}).values()),
            outbox_accepted=int(outbox.get("accepted", 0)),
            outbox_delivered=int(outbox.get("delivered", 0)),
            outbox_refused=int(outbox.get("refused", 0)),
            pipelines=self.pipelines(time.monotonic()),
        )
