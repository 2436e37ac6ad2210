"""The systemd notification protocol (``sd_notify``): state lines over a Unix datagram socket.

systemd passes the socket's address in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract address) and, with ``WatchdogSec=``, the ping interval in ``$WATCHDOG_USEC`` (for
the process ``$WATCHDOG_PID`` if set). Each message is ``KEY=value`` lines in one datagram
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1``, ``STOPPING=1``).

Written here rather than taken from a library: it is one ``sendto`` on a non-blocking socket.
``systemd-python`` needs libsystemd's headers and a compiler to install, and the pure-Python
``sdnotify`` package has not had a release for years; neither would save more than these lines.

Owns the socket; used from the event loop only (sends never block: a full socket drops the
message, which systemd tolerates for everything but the watchdog, sent again shortly).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("cached.sdnotify")


class Notifier:
    """Sends state to the service manager; does nothing when not run by one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_interval = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message (``send(READY=1, STATUS="...")``); False if it was not sent."""
        if self._sock is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:  # the manager went away, or its queue is full
            log.debug("sd_notify %s: %s", text.split("\n", 1)[0], exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to us.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog timeout in seconds, when systemd asks this process for pings."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6
