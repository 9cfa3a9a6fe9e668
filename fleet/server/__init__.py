"""``edge-fleet server``: the fleet's control plane (desired state, rollouts, history).

Needs the ``server`` extra; nothing under ``agent`` or the plain console imports it.
"""
