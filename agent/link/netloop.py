"""paho's network loop on ``poll()`` instead of ``select()``.

paho's own ``loop()`` waits in ``select()``, which cannot watch a file descriptor
of 1024 (FD_SETSIZE) or more: paho then reports "the connection was lost", at once
and on every reconnect, and the link never comes up. A process that holds many
files (a busy device, or a benchmark running a hundred agents in one process) is
handed such descriptors. ``poll()`` has no such limit.

This is paho's documented external-loop integration: ``on_socket_register_write``
tells the loop there is output waiting, and the loop calls ``loop_read``,
``loop_write`` and ``loop_misc``. Every socket write happens on the loop's thread;
another thread that publishes only wakes it through a pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

_READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class PollLoop:
    """Drives one paho client from one thread. ``close()`` when done."""

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        client.on_socket_register_write = self._wake
        client.on_socket_unregister_write = None

    def _wake(self, client: Any, userdata: Any, sock: Any) -> None:
        # Called by paho on any thread that queued a packet: must not block.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def once(self, timeout: float) -> MQTTErrorCode:
        """One turn of paho's loop: wait up to ``timeout`` s for the socket or a wake-up,
        then read, write and run paho's housekeeping (keepalive, retries)."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        pending = getattr(sock, "pending", None)
        buffered = pending() if pending is not None else 0  # TLS: decrypted, unread
        poller = select.poll()
        poller.register(sock, _READ_EVENTS | (select.POLLOUT if client.want_write() else 0))
        poller.register(self._wake_r, select.POLLIN)
        events = dict(poller.poll(0 if buffered else max(0, int(timeout * 1000))))
        if self._wake_r in events:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        happened = events.get(sock.fileno(), 0)
        if happened & select.POLLNVAL:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if happened & _READ_EVENTS or buffered:
            rc = client.loop_read()
            if rc or client.socket() is None:
                return rc
        if client.want_write():
            rc = client.loop_write()
            if rc or client.socket() is None:
                return rc
        return client.loop_misc()

    def close(self) -> None:
        """Hand writing back to the caller's thread (paho writes at once when no loop
        is registered), for the last packets once the loop's thread has ended."""
        self._client.on_socket_register_write = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
