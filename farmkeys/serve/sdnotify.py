"""systemd's notify protocol, for `farmkeys serve` under ``Type=notify``.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract socket
when it starts with ``@``). serve sends ``READY=1`` once it has synced and
joined the election, ``STATUS=`` lines as things happen, ``WATCHDOG=1`` every
half ``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``, and
``STOPPING=1`` on the way out. Outside systemd (no ``$NOTIFY_SOCKET``) every
call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

# The name these lines have always carried, before sdnotify moved into serve/.
log = logging.getLogger("farmkeys.sdnotify")


class Notifier:
    """Speaks to the service manager named in the environment, if any."""

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` describe.

        The watchdog is on when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID`` is absent or this process's id."""
        raw = environ.get("NOTIFY_SOCKET") or None
        address: str | bytes | None = raw
        if raw is not None and raw.startswith("@"):
            address = b"\0" + raw[1:].encode()
        usec: int | None = None
        text, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID")
        if text.isdigit() and int(text) > 0 and (pid is None or pid == str(os.getpid())):
            usec = int(text)
        return cls(address, watchdog_usec=usec)

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the manager's timeout; None when off."""
        if self.address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send one message; True when it was sent. Never raises: a manager that went
        away must not stop the service."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify the service manager: %s", exc.strerror or exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", _status(status))

    def status(self, text: str) -> None:
        self.notify(_status(text))

    def watchdog(self) -> None:
        if self.watchdog_interval_seconds is not None:
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())
