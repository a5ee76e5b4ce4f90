"""Audio notifications at a low CPU cost: BlueZ AcquireNotify, read in batches.

Why: with StartNotify every notification is a D-Bus ``PropertiesChanged`` signal that bleak
parses in Python, and with bleak's own AcquireNotify reader every notification is still one
event-loop wake-up. At 50–100 notifications/s that alone cost 0.6–0.9 % of a core on a silent
pendant (bench/daemon.py idle figure), more than the whole idle budget.

So the audio characteristic is subscribed with AcquireNotify (bluez-for-tests.md §7: a
``SOCK_SEQPACKET`` socket, one datagram per notification) and we take the socket over from
bleak: it is drained on a timer every ``BATCH_SECONDS`` and the packets go to the session in
one call. The socket buffers them meanwhile (≈ 270 notifications, 2.7 s at 100/s, far more than
one batch). While nothing arrives the socket is watched instead of polled, so the first packet
after a quiet spell (e.g. a pendant that paused on silence, omi-device.md §5.2) wakes us at
once and carries a precise arrival time; only packets behind it in a busy stream are batched.

Fallback: StartNotify (bleak's per-signal callback; packets are batched the same way, only the
wake-ups stay) when

- BlueZ lacks AcquireNotify (no ``NotifyAcquired`` property, before 5.46: bleak then uses
  StartNotify itself) or answers ``UnknownMethod``;
- AcquireNotify is refused: ``NotSupported`` (no notify flag for acquiring), ``Failed``;
  ``NotPermitted`` / ``InProgress`` (someone holds the notify session: after a short retry,
  since our own MTU probe may still hold it, bridge/devices/omi/session.py ``acquire_mtu``);
- bleak's private fd table, which we take the socket from, is missing (another bleak
  version): bleak's own AcquireNotify reader is kept.

The socket is ours once taken: ``close()`` (from the session's ``connection_lost``) closes it,
which releases BlueZ's notify lock; BlueZ closes its end on disconnect (``HUP``), and then we
stop watching it at once rather than spin on an always-readable socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakDBusError, BleakGATTProtocolError, BleakGATTProtocolErrorCode

_LOGGER = logging.getLogger(__name__)

BATCH_SECONDS = 0.3
"""Packets are handed on at most this often while a stream flows: 3 wake-ups/s instead of 50–100.
A wake-up, not a packet, is what costs: after a sleep the caches are cold, and one batch of ten
silent notifications took 460 µs of the capture thread against 140 µs back to back; each
hand-off wakes the loop and then the capture thread. The daemon on a silent pendant, 0.2 s and
0.3 s alternating, median of 3: 0.52 % → 0.44 % of a core (0.1 s cost 0.84 %). Downstream
stages work in seconds (VAD pauses, ASR windows), so 0.3 s of latency costs nothing; the first
packet after a quiet spell still goes on at once; the socket holds > 2 s of notifications, so a
batch never overflows it."""

MAX_DATAGRAM = 1024
"""Larger than any notification (ATT MTU ≤ 517, Core Vol 3 Part F §3.2.9); bleak reads 1024 too."""

ACQUIRE_ATTEMPTS = 3
ACQUIRE_RETRY_SECONDS = 0.2
"""``NotPermitted``/``InProgress`` right after our MTU probe: BlueZ may not yet have seen the
probe's fd close (it releases the lock on HUP); a short retry covers that window."""

# BlueZ error names (doc/org.bluez.GattCharacteristic.rst: AcquireNotify may fail with Failed,
# NotSupported, NotPermitted; InProgress when a StartNotify session exists; UnknownMethod on a
# BlueZ without the method).
_RETRY_ERRORS = {"org.bluez.Error.NotPermitted", "org.bluez.Error.InProgress"}
_FALLBACK_ERRORS = _RETRY_ERRORS | {"org.bluez.Error.NotSupported", "org.bluez.Error.Failed",
                                    "org.freedesktop.DBus.Error.UnknownMethod"}

OnBatch = Callable[[list[bytes], float], None]
"""``on_batch(packets, at)``: notifications in arrival order; ``at``: monotonic time by which
the last one had arrived (exact for a packet that woke us, ≤ one batch late otherwise)."""


class BatchedNotifications:
    """One characteristic's notifications, delivered in batches (see the module docstring)."""

    def __init__(self, label: str, on_batch: OnBatch, *, period: float = BATCH_SECONDS) -> None:
        self.label = label
        self.on_batch = on_batch
        self.period = period
        self.mode: str | None = None
        """How notifications arrive: "acquire" (our socket, batched reads), "start" (StartNotify) or
        "bleak" (bleak reads its own fd)."""
        self.last_packet_at: float | None = None
        """Monotonic time of the last batch with data (for the watchdog)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._watching = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending: list[bytes] = []
        self._closed = False

    async def async_start(self, client: BleakClient, char: BleakGATTCharacteristic) -> str:
        """Subscribe; returns the mode used. Raises what a subscription on a healthy link should
        not raise (e.g. the link went away meanwhile)."""
        self._loop = asyncio.get_running_loop()
        for attempt in range(1, ACQUIRE_ATTEMPTS + 1):
            try:
                await client.start_notify(char, self._on_packet, bluez={"use_start_notify": False})
                break
            except BleakDBusError as exc:
                if exc.dbus_error in _RETRY_ERRORS and attempt < ACQUIRE_ATTEMPTS:
                    _LOGGER.debug("%s AcquireNotify: %s; retrying", self.label, exc)
                    await asyncio.sleep(ACQUIRE_RETRY_SECONDS)
                    continue
                if exc.dbus_error not in _FALLBACK_ERRORS:
                    raise
                return await self._start_notify(client, char, exc)
            except BleakGATTProtocolError as exc:
                # bleak turns BlueZ's NotSupported into this for AcquireNotify (assert_gatt_reply).
                if exc.code != BleakGATTProtocolErrorCode.REQUEST_NOT_SUPPORTED:
                    raise
                return await self._start_notify(client, char, exc)
            except (IndexError, KeyError, TypeError) as exc:  # no fd in the reply (bus without fd passing)
                return await self._start_notify(client, char, exc)
        fds: Any = getattr(getattr(client, "_backend", None), "_notification_fds", None)
        fd = fds.pop(char.obj[0], None) if isinstance(fds, dict) else None
        if fd is None:
            # No fd: bleak chose StartNotify itself (BlueZ without NotifyAcquired), or this bleak
            # keeps its fds elsewhere and reads them itself. Either way bleak calls _on_packet.
            self.mode = "start" if isinstance(fds, dict) else "bleak"
            _LOGGER.debug("%s notifications via bleak (%s)", self.label, self.mode)
            return self.mode
        # Take the socket over from bleak: its reader wakes us once per notification.
        self._loop.remove_reader(fd)
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self.mode = "acquire"
        self._watch()
        _LOGGER.debug("%s notifications via AcquireNotify, read every %g s", self.label, self.period)
        return self.mode

    async def _start_notify(self, client: BleakClient, char: BleakGATTCharacteristic,
                            why: BaseException) -> str:
        _LOGGER.info("%s AcquireNotify unavailable (%s); using StartNotify", self.label, why)
        for attempt in range(1, ACQUIRE_ATTEMPTS + 1):
            try:
                await client.start_notify(char, self._on_packet)
                break
            except BleakDBusError as exc:
                if attempt == ACQUIRE_ATTEMPTS or exc.dbus_error not in _RETRY_ERRORS:
                    raise
                _LOGGER.debug("%s StartNotify: %s; retrying", self.label, exc)
                await asyncio.sleep(ACQUIRE_RETRY_SECONDS)
        self.mode = "start"
        return self.mode

    def flush(self) -> None:
        """Read and hand on whatever is buffered now (cheap when nothing is)."""
        if not self._closed:
            self._drain()
            self._deliver(time.monotonic())

    def close(self) -> None:
        """The connection is over: hand on what is buffered, release the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drain()  # may find the hang-up and release the socket itself
        if self._sock is not None:
            self._unwatch()
            self._sock.close()
            self._sock = None
        self._deliver(time.monotonic())

    # -------------------------------------------------------------- bleak callback (fallback)

    def _on_packet(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        if self._closed:
            return
        self._pending.append(bytes(data))
        if self._timer is None:
            # The first packet after a quiet spell goes on at once (its arrival time matters to
            # the timeline); the ones behind it wait for the batch timer.
            self._deliver(time.monotonic())
            self._schedule()

    # -------------------------------------------------------------- our socket

    def _watch(self) -> None:
        if self._sock is not None and not self._watching:
            assert self._loop is not None
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._sock is not None and self._watching:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _on_readable(self) -> None:
        # A packet after a quiet spell: hand it on now, then read in batches while data flows.
        self._unwatch()
        self._drain()
        self._deliver(time.monotonic())
        if self._sock is not None:
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self.period, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._drain()
        if not self._pending:
            self._watch()  # quiet: wait for the next packet instead of polling
            return
        self._deliver(time.monotonic())
        self._schedule()

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recv, pending = sock.recv, self._pending
        while True:
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                self._hangup(exc)
                return
            if not data and self._hung_up():
                self._hangup(None)
                return
            pending.append(data)

    def _hung_up(self) -> bool:
        """An empty read is either an empty notification or the peer's close; HUP tells."""
        import select

        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLHUP)
        return bool(poller.poll(0))

    def _hangup(self, exc: OSError | None) -> None:
        # BlueZ closed its end: the link is going down (the disconnect callback follows) or BlueZ
        # dropped the session. Stop reading; the watchdog remakes a link that stays silent.
        _LOGGER.debug("%s notification socket closed%s", self.label, f": {exc}" if exc else "")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwatch()
        assert self._sock is not None
        self._sock.close()
        self._sock = None

    def _deliver(self, now: float) -> None:
        if not self._pending:
            return
        packets, self._pending = self._pending, []
        self.last_packet_at = now
        try:
            self.on_batch(packets, now)
        except Exception:  # a bug downstream must not stop the stream
            _LOGGER.exception("%s audio handler failed", self.label)

