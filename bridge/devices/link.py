"""One paired device: its link, its driver, its audio timeline and capture, and its stats.

``DeviceLink`` is what the daemon (and ``listen``) runs per paired device: ``await
link.run(stop)`` until ``stop`` is set; ``link.stats``, ``link.timeline.started_at`` and
``link.supervisor.connected_event`` / ``disconnected_event`` are there to watch. It picks the
driver for the device's kind from ``DRIVERS`` (a plain table: which code runs for which kind is
read here), lets ``LinkSupervisor`` keep the link (bridge/link/supervisor.py) and, about once a
second, lets the timeline meet wall clock while the link is down or the device is connected but
quiet (``AudioTimeline.quiet``) and reports ``LinkStats`` through ``on_stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from bridge.audio.capture import Capture
from bridge.audio.timeline import QUIET_SECONDS, AudioTimeline
from bridge.config import DeviceConfig, LinkOptions
from bridge.core.kinds import DeviceKind
from bridge.core.pcm import PcmSink
from bridge.core.stats import LinkStats
from bridge.devices.frame.session import FrameSession
from bridge.devices.omi.session import OmiSession
from bridge.link.supervisor import TICK_SECONDS, LinkSupervisor, SessionContext

_LOGGER = logging.getLogger(__name__)

DRIVERS: Mapping[DeviceKind, type[OmiSession] | type[FrameSession]] = {
    DeviceKind.OMI: OmiSession,
    DeviceKind.FRAME: FrameSession,
}
"""The session class that runs each connection to a device of that kind."""


class DeviceLink:
    """One paired device's link, audio timeline and stats: what the daemon runs per device.

    ``sink`` receives the device's 16 kHz timeline; ``on_stats`` gets the live ``LinkStats``
    about once a second and on every connect/disconnect. ``extra`` goes to the session
    (``SessionContext.extra``): ``{"frame": FrameOptions}`` for Frame, ``{"on_button":
    callable(int)}`` for Omi button events. With ``raise_errors`` a ``BridgeError`` from the
    session (e.g. an unknown codec) ends ``run()`` instead of being retried (``listen`` uses it).
    """

    def __init__(self, device: DeviceConfig, options: LinkOptions, sink: PcmSink,
                 on_stats: Callable[[LinkStats], None] | None = None, *,
                 extra: dict[str, Any] | None = None, raise_errors: bool = False,
                 capture_thread: bool = False) -> None:
        self.device = device
        self.options = options
        self.stats = LinkStats()
        self.timeline = AudioTimeline(sink)
        self.on_stats = on_stats
        self.capture = Capture(device.label, threaded=capture_thread, stats=self.stats)
        """``capture_thread``: decoding and the sink run on a thread of this device's (the
        daemon: its sink does VAD and disk writes); otherwise inline on the loop."""
        self.context = SessionContext(device, self.timeline, self.stats, options, dict(extra or {}),
                                      capture=self.capture)
        # A kind the config check let through (a test, an API caller) still fails in words.
        cls = DRIVERS[DeviceKind.parse(device.kind, f"kind of {device.label}")]
        self._fill_quiet = cls.FILL_QUIET
        """Sessions whose device may go quiet while connected set ``FILL_QUIET`` (Omi); Frame
        reports its mic pauses itself and opens the gap on that signal."""
        self.supervisor = LinkSupervisor(
            device, options, lambda: cls(self.context), self.stats,
            service_uuids=cls.SERVICE_UUIDS, raise_errors=raise_errors,
            on_link_down=self._link_down)
        self.context.end_connection = self.supervisor.end_connection

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link until ``stop`` is set; then disconnect and return."""
        self.capture.start()
        ticker = asyncio.create_task(self._tick(stop))
        try:
            await self.supervisor.run(stop)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if self.capture.threaded:
                await asyncio.to_thread(self.capture.stop)  # what was captured reaches the sink
            self._report()

    def _link_down(self) -> None:
        self.capture.submit(self.timeline.link_down)  # after the session's last audio

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
            # The wall clock the fills aim at is read here, on the loop, in order with the audio.
            if not self.stats.connected:
                self.capture.submit(functools.partial(self.timeline.catch_up, time.monotonic()))
            elif self._fill_quiet:
                # A pendant may pause notifications on silence yet stay connected (AAD,
                # omi-device.md §5.2): keep the timeline meeting wall clock meanwhile. Packets
                # still buffered (a stalled loop) are handed on first, so they are not taken
                # for a pause.
                # Audio handed on within QUIET_SECONDS cannot leave the timeline quiet, so then
                # neither the flush nor the check is needed: skipping them spares a streaming
                # pendant two of its few capture wake-ups a second (bench/daemon.py idle row).
                session = self.supervisor.session
                last = getattr(session, "last_activity", None)
                if last is None or time.monotonic() - last > QUIET_SECONDS:
                    flush = getattr(session, "flush", None)
                    if flush is not None:
                        flush()
                    self.capture.submit(functools.partial(self.timeline.quiet, time.monotonic()))
            self.stats.samples_written = self.timeline.samples_written
            self._report()

    def _report(self) -> None:
        if self.on_stats is not None:
            try:
                self.on_stats(self.stats)
            except Exception:
                _LOGGER.exception("%s on_stats callback failed", self.device.label)
