"""The fleet server's HTTP API: one router per resource, mounted by ``fleet.server.app``."""
