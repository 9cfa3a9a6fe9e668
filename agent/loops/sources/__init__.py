"""Frame sources: a registry keyed by the config's ``type`` (see ``base``)."""

from agent.loops.sources.base import (
    CaptureThread,
    EndOfStream,
    Source,
    SourceError,
    create_source,
    source_types,
)

__all__ = [
    "CaptureThread",
    "EndOfStream",
    "Source",
    "SourceError",
    "create_source",
    "source_types",
]
