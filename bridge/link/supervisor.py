"""Keep one device's BLE link alive forever, for any kind of device.

The supervisor owns the *link*: finding the device, connecting, noticing loss, backing off and
reconnecting, the watchdog and re-attaching after our own restart. What happens on a connection
is the job of a per-connection **session** (Omi: ``bridge.devices.omi.session.OmiSession``; Frame: the
Frame driver). A session is anything with this shape::

    class MySession:
        SERVICE_UUIDS: tuple[str, ...]      # class attribute: how to find the device among
                                            # those BlueZ already holds connected (re-attach)
        FILL_QUIET: bool                    # class attribute: the device may stop
                                            # sending while connected (AAD); the link then fills
                                            # wall-clock silence (AudioTimeline.quiet)
        def __init__(self, ctx: SessionContext) -> None: ...
        last_activity: float | None         # monotonic time of the last data from the device;
                                            # the watchdog reconnects when it is older than
                                            # [link] watchdog_seconds (None: counts from connect)
        async def async_start(self, client: BleakClient) -> None:
            # connect-time setup: read, subscribe, write. Raise BridgeError for problems the
            # user must fix (logged with the hint; retried at the longest back-off, or raised
            # from run() when the link was made with raise_errors=True); anything else is
            # treated as a transient failure of this connection.
        async def async_stop(self, client: BleakClient) -> None:
            # optional last words before *our own* disconnect (e.g. tell the device to stop)
        def flush(self) -> None:
            # optional: hand on data still buffered (called before the quiet check, FILL_QUIET)
        def connection_lost(self) -> None:
            # the connection is over, whichever way; called exactly once per started session.
            # Flush held audio here; the link then opens a gap in the timeline itself.

A fresh session is made for every connection, so per-connection state (decoder, reassembly)
never leaks across a reconnect. ``SessionContext`` carries what outlives connections: the
device's config, the ``AudioTimeline`` and the ``LinkStats``.

``bridge.devices.link.DeviceLink`` puts a supervisor, the driver for the device's kind and its
audio timeline together: it is what the daemon runs per paired device.

Policy (after Home Assistant's bleak-retry-connector):

- Failures are sorted into kinds (adapter, device missing, busy, auth, transient, device
  problem); each kind has a minimum back-off and advice for a human, logged once per change
  of kind, not on every retry.
- Back-off: ``reconnect_min_seconds`` doubling per consecutive failure up to
  ``reconnect_max_seconds``, times a random factor in [0.5, 1] so several bridges do not
  retry in lock-step. A link that was lost (not a failed attempt) retries after
  ``reconnect_min_seconds`` at once, which keeps a device in range reconnecting in well under
  2 s. A connection that never delivered any data before the watchdog fired counts as a
  failure (it would otherwise be remade every watchdog period forever).
- Every attempt looks the device up again: first among devices BlueZ already holds connected
  (after our own crash BlueZ keeps the link and the device stops advertising;
  bluez-for-tests.md §9.1), then by scanning for the address. A ``BLEDevice`` from an earlier
  attempt is never reused (BlueZ forgets unseen devices, and bleak then raises a plain
  ``BleakError("... not found")``, §9.2).
- ``disconnected_callback`` also fires on our own ``disconnect()`` (§9.3): the
  ``_expected_disconnect`` flag tells our disconnects from link loss.
- A session that gives up on its device while connected (Frame's app died) calls
  ``SessionContext.end_connection``: the disconnect is ours (expected), the reason becomes the
  link's last error, and the next attempt backs off like a failure, so a device that keeps
  failing the same way is not reconnected in a tight loop.
- Nothing escapes ``run()`` except cancellation (and, with ``raise_errors``, ``BridgeError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from bleak import BleakAdapter, BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.exc import (
    BleakError,
)

from bridge.audio.capture import Capture
from bridge.audio.timeline import AudioTimeline
from bridge.config import DeviceConfig, LinkOptions
from bridge.core.errors import BridgeError, DeviceNotFoundError
from bridge.core.stats import LinkStats
from bridge.link.adapter import adapter_args, client_args, connect_lock, scanner_args
from bridge.link.failures import (
    DEVICE_MISSING,
    TRANSIENT,
    WRONG_DEVICE,
    FailureKind,
    backoff_seconds,
    classify,
)

_LOGGER = logging.getLogger(__name__)

TICK_SECONDS = 1.0
"""How often the link checks the watchdog, fills outage silence and reports stats: often enough
for downstream conversation timers, rare enough to cost nothing."""

DISCONNECT_TIMEOUT = 5.0
"""Our own disconnect gives up after this long (bleak itself waits up to 10 s for BlueZ)."""

@dataclass
class SessionContext:
    """What a session gets: the parts that outlive one connection."""

    device: DeviceConfig
    timeline: AudioTimeline
    stats: LinkStats
    options: LinkOptions
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific settings (e.g. ``{"frame": FrameOptions}``) and hooks (``"on_button"``)."""
    capture: Capture = field(default_factory=Capture)
    """Where audio work runs: every write to ``timeline`` (and any decoding before it) goes
    through ``capture.submit`` from the loop, so it keeps its order with the link's gap fills
    (bridge/audio/capture.py)."""
    end_connection: Callable[[str], None] = field(default=lambda _why: None)
    """A session calls it to end its connection on purpose (e.g. the app on Frame died): the
    supervisor disconnects as its own disconnect, not a lost link, reports ``why`` as the
    link's last error and reconnects with the back-off of a failure (``LinkSupervisor.
    end_connection``). ``DeviceLink`` wires it to its supervisor."""

    @property
    def label(self) -> str:
        return self.device.label


class Session(Protocol):
    SERVICE_UUIDS: tuple[str, ...]
    FILL_QUIET: bool
    last_activity: float | None

    async def async_start(self, client: BleakClient) -> None: ...

    def connection_lost(self) -> None: ...


# --------------------------------------------------------------------------------------------


class LinkSupervisor:
    """Connects, supervises and reconnects one device forever; see the module docstring."""

    def __init__(self, device: DeviceConfig, options: LinkOptions,
                 session_factory: Callable[[], Any], stats: LinkStats, *,
                 service_uuids: Sequence[str], raise_errors: bool = False,
                 on_link_down: Callable[[], None] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.device = device
        self.options = options
        self.stats = stats
        self.service_uuids = list(service_uuids)
        self.raise_errors = raise_errors
        self._session_factory = session_factory
        self._on_link_down = on_link_down
        self._rand = rand
        self._expected_disconnect = False
        self._lost = asyncio.Event()
        self._ended = asyncio.Event()
        self.session: Any = None
        """The session of the current (or last) connection."""
        self._connections = 0
        self._last_kind: FailureKind | None = None
        self.connected_event = asyncio.Event()
        """Set while connected (tests and ``listen`` wait on it)."""
        self.disconnected_event = asyncio.Event()
        """Set while not connected (cleared by a connect, set when that connection is over)."""
        self.disconnected_event.set()

    @property
    def label(self) -> str:
        return self.device.label

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                reason = await self._async_connection(stop)
            except asyncio.CancelledError:
                raise
            except BridgeError as exc:
                if self.raise_errors and not isinstance(exc, DeviceNotFoundError):
                    raise
                failures += 1
                self._failed(exc, classify(exc), failures)
                delay = backoff_seconds(failures, self.options, classify(exc), self._rand)
            except Exception as exc:  # never crash: every failure becomes a back-off
                failures += 1
                kind = classify(exc)
                if self.raise_errors and kind is WRONG_DEVICE:
                    raise BridgeError(f"{self.label}: {exc}", kind.advice) from exc
                self._failed(exc, kind, failures)
                delay = backoff_seconds(failures, self.options, kind, self._rand)
            else:
                if reason == "stop":
                    break
                if reason in ("silent", "ended"):
                    # Connected but never a byte of data (e.g. MTU < 100, or another app holds the
                    # audio), or the session gave up on the device: reconnecting at once could
                    # repeat forever, so back off like a failure.
                    failures += 1
                    delay = backoff_seconds(failures, self.options, TRANSIENT, self._rand)
                else:
                    failures = 0
                    # The link was up and went away: the device is probably still in range.
                    delay = self.options.reconnect_min_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _failed(self, exc: BaseException, kind: FailureKind, failures: int) -> None:
        text = str(exc) or type(exc).__name__
        self.stats.last_error = text
        if kind is not self._last_kind:
            hint = getattr(exc, "hint", "") or kind.advice
            _LOGGER.warning("%s %s: %s (%s)", self.label, kind.name, text, hint)
            if kind is TRANSIENT and not isinstance(exc, (BleakError, TimeoutError)):
                _LOGGER.debug("%s unexpected error", self.label, exc_info=exc)
        else:
            _LOGGER.debug("%s %s again (%d failures): %s", self.label, kind.name, failures, text)
        self._last_kind = kind

    async def _async_find(self, stop: asyncio.Event) -> BLEDevice:
        address = self.device.address.upper()
        adapter = await BleakAdapter.get(bluez=adapter_args(self.options.adapter))
        for dev in await adapter.get_connected_devices(self.service_uuids):
            if dev.address.upper() == address:
                _LOGGER.info("%s is still connected in BlueZ; re-attaching", self.label)
                return dev
        found = await _until_stop(stop, BleakScanner.find_device_by_address(
            address, timeout=self.options.scan_timeout_seconds, bluez=scanner_args(self.options.adapter)))
        if found is None:
            raise DeviceNotFoundError(
                f"{self.label} ({address}) was not seen in {self.options.scan_timeout_seconds:g} s",
                DEVICE_MISSING.advice)
        return found

    async def _async_connection(self, stop: asyncio.Event) -> str:
        """One connection from lookup to its end; returns why it ended: "stop" (asked to),
        "lost" (link loss), "watchdog" (data stopped), "silent" (no data at all) or "ended" (the
        session ended it, ``end_connection``)."""
        device = await self._async_find(stop)
        if stop.is_set():
            return "stop"
        self._lost.clear()
        self._ended.clear()
        self._expected_disconnect = False
        client = BleakClient(device, self._on_disconnected, timeout=self.options.connect_timeout_seconds,
                             bluez=client_args(self.options.adapter))
        await _until_stop(stop, self._async_connect(client))
        if stop.is_set():
            await self._async_disconnect(client)
            return "stop"
        session = self._session_factory()
        self.session = session
        try:
            async with asyncio.timeout(self.options.connect_timeout_seconds):
                await session.async_start(client)
        except BaseException:
            session.connection_lost()
            await self._async_disconnect(client)
            raise
        self._connections += 1
        if self._connections > 1:
            self.stats.reconnects += 1
        self.stats.connected = True
        self.stats.connected_since = datetime.now(UTC)
        self.stats.last_error = None
        self._last_kind = None
        self.connected_event.set()
        self.disconnected_event.clear()
        _LOGGER.info("%s connected%s", self.label,
                     "" if self.label == device.address else f" ({device.address})")
        connected_at = time.monotonic()
        reason = "stop"
        try:
            while not stop.is_set():
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._lost.wait()),
                           asyncio.ensure_future(self._ended.wait())]
                _done, pending = await asyncio.wait(waiters, timeout=TICK_SECONDS,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                if self._ended.is_set():
                    reason = "ended"
                    break
                if self._lost.is_set():
                    reason = "lost"
                    break
                last = session.last_activity
                if time.monotonic() - (last or connected_at) > self.options.watchdog_seconds:
                    reason = "watchdog" if last is not None else "silent"
                    break
        finally:
            self.stats.connected = False
            self.connected_event.clear()
            if reason == "lost":
                _LOGGER.warning("%s link lost; reconnecting", self.label)
            elif reason in ("watchdog", "silent"):
                _LOGGER.warning("%s sent no data for %g s%s; reconnecting", self.label,
                                self.options.watchdog_seconds,
                                "" if reason == "watchdog" else " since connecting")
            if reason not in ("lost", "ended"):
                stop_hook = getattr(session, "async_stop", None)
                if stop_hook is not None and client.is_connected:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(DISCONNECT_TIMEOUT):
                            await stop_hook(client)
            if reason != "lost":
                await self._async_disconnect(client)
            session.connection_lost()
            if self._on_link_down is not None:
                self._on_link_down()
            self.disconnected_event.set()
        return reason

    def end_connection(self, why: str) -> None:
        """End the current connection on purpose (``SessionContext.end_connection``)."""
        self._expected_disconnect = True  # the disconnect that follows is ours
        self.stats.last_error = why
        self._ended.set()

    async def _async_connect(self, client: BleakClient) -> None:
        """Connect (and resolve services) while no other link connects on this adapter: BlueZ
        answers a second concurrent attempt ``InProgress`` (bridge/link/adapter.py)."""
        async with connect_lock(self.options.adapter):
            await client.connect()

    async def _async_disconnect(self, client: BleakClient) -> None:
        self._expected_disconnect = True
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await client.disconnect()
        except Exception as exc:  # the link may already be gone; nothing to do about it
            _LOGGER.debug("%s disconnect: %s", self.label, exc)

    def _on_disconnected(self, _client: BleakClient) -> None:
        if self._expected_disconnect:
            _LOGGER.debug("%s disconnected (by us)", self.label)
            return
        self._lost.set()


_T = TypeVar("_T")


async def _until_stop(stop: asyncio.Event, coro: Awaitable[_T]) -> _T | None:
    """Await ``coro`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None
    return task.result()
