"""edge-agent: the on-device daemon of edge-deploy."""

__version__ = "0.1.0"
