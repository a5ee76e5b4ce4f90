"""Talking to systemd without libsystemd: ``sd_notify`` over ``$NOTIFY_SOCKET`` and journald detection.

The protocol (sd_notify(3), systemd.service(5)): systemd passes the path of an ``AF_UNIX``
``SOCK_DGRAM`` socket in ``$NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE``
assignments as one datagram. A path starting with ``@`` names a socket in the Linux abstract
namespace (the ``@`` becomes a NUL byte). ``$WATCHDOG_USEC`` is the watchdog timeout in
microseconds; ``$WATCHDOG_PID``, when set, names the only process the watchdog applies to.

Everything here is a no-op outside systemd, so the daemon calls it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping

_LOGGER = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
"""``device:inode`` of the stream stderr is connected to when systemd hooks it to journald
(systemd.exec(5)); only trustworthy if it matches our own stderr."""
INVOCATION_ID_ENV = "INVOCATION_ID"
"""Set by systemd for every unit it runs (systemd.exec(5))."""

WATCHDOG_FRACTION = 0.5
"""Ping at half the watchdog timeout, as sd_watchdog_enabled(3) recommends."""
STATUS_MAX_CHARS = 200
"""systemctl shows STATUS= on one line; keep it short enough to read there."""
ABSTRACT_PREFIX = "@"
"""sd_notify(3): a NOTIFY_SOCKET starting with '@' is in the abstract namespace."""


class Notifier:
    """Sends sd_notify messages for this process; every method is a no-op when not under systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get(NOTIFY_SOCKET_ENV, ""))
        self._sock: socket.socket | None = None
        self.watchdog_seconds: float | None = _watchdog_seconds(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when systemd does not watch us."""
        if self.watchdog_seconds is None:
            return None
        return self.watchdog_seconds * WATCHDOG_FRACTION

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if not under systemd or the send failed."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # systemd may be restarting (daemon-reexec); losing one ping is fine, spamming the log is not.
            if not self._warned:
                _LOGGER.warning("cannot notify systemd at %s: %s", os.environ.get(NOTIFY_SOCKET_ENV), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_line(text: str) -> str:
    one_line = " ".join(text.split())
    if len(one_line) > STATUS_MAX_CHARS:
        one_line = one_line[: STATUS_MAX_CHARS - 1] + "…"
    return f"STATUS={one_line}"


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith(ABSTRACT_PREFIX):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock:... addresses exist for VMs; we never run there, so treat anything else as absent.
    _LOGGER.debug("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    raw = env.get(WATCHDOG_USEC_ENV, "")
    if not raw:
        return None
    pid = env.get(WATCHDOG_PID_ENV, "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent's)
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def under_journald(env: Mapping[str, str] | None = None) -> bool:
    """True when stderr goes to journald (which timestamps every line itself)."""
    env = os.environ if env is None else env
    stream = env.get(JOURNAL_STREAM_ENV, "")
    if stream:
        try:
            dev, ino = (int(x) for x in stream.split(":"))
            st = os.fstat(sys.stderr.fileno())
        except (ValueError, OSError, AttributeError):
            return False
        return st.st_dev == dev and st.st_ino == ino
    # Started by systemd with output not on the journal stream (e.g. a file): still no need for our
    # timestamps when INVOCATION_ID is set and stderr is not a terminal.
    return bool(env.get(INVOCATION_ID_ENV)) and not _isatty_stderr()


def _isatty_stderr() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
