"""systemd's service notification protocol (sd_notify), written to ``$NOTIFY_SOCKET`` directly.

The protocol is one datagram of ``KEY=VALUE`` lines to a Unix socket; a name starting with "@" is
in the abstract namespace (its first byte is NUL on the wire). No library is needed, and outside
systemd (no ``$NOTIFY_SOCKET``) every call is a silent no-op. See sd_notify(3).

The watchdog: systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) from ``WatchdogSec=``; the
service must send ``WATCHDOG=1`` more often than that, from the loop that does its work, so that a
hung loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages for this process; a no-op when not started by systemd with Type=notify."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_seconds = _watchdog_seconds(env)
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent. Failures are logged, never raised:
        a service must not die because its supervisor's socket went away."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            log.warning("could not notify systemd at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(name: str) -> str | bytes | None:
    """The sendto() address of ``$NOTIFY_SOCKET``: a path, or bytes for an abstract ("@name") socket."""
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode("utf-8")
    if name.startswith("/"):
        return name
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract '@' name "
                "(selftune speaks only the AF_UNIX form of the protocol)", name)
    return None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, if it is meant for this process (``$WATCHDOG_PID`` absent or ours)."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split())
