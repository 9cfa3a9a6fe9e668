"""edge-fleet: the reference fleet console for edge-deploy devices.

It speaks only the wire protocol of ``agent.protocol`` (docs/protocol.md) and
checks bundles with ``agent.models.manifest``; it never imports agent internals.
"""
