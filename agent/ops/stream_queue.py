"""Whether a streaming model's pipeline sees every window (``edge-agent check``).

A model that keeps state between windows (manifest ``state``) hears a broken stream
when windows are dropped, and a pipeline with ``queue: latest`` drops every window
that arrives while the model is busy. Pure: settings and manifest, no runtime."""

from __future__ import annotations

from agent.config import PipelineConfig
from agent.models.manifest import Manifest


def stream_queue_warning(pipeline: PipelineConfig, manifest: Manifest) -> str | None:
    """One line when a streaming model runs on a pipeline that may drop windows."""
    if not manifest.state or pipeline.queue != "latest":
        return None
    return (
        f"{manifest.name} {manifest.version} keeps state between windows, but pipeline "
        f"{pipeline.name!r} has queue 'latest': windows it drops break the model's stream"
    )
