"""One device's audio work off the event loop: decode, timeline, VAD and spool on a thread.

Why: the event loop reads every BLE notification. If it also decodes, runs Silero and appends
speech to the spool, one slow ``fsync`` (hundreds of milliseconds on a Raspberry Pi's SD card,
several per utterance) stops it reading; BlueZ drops notifications once the AcquireNotify
socket is full (bluez-for-tests.md §7), and that audio is gone.

How: with ``threaded=True`` the loop only copies bytes. Every piece of audio work, a batch of
notifications to decode or a timeline event the loop decided on the wall clock (a gap opened,
silence to fill up to monotonic time *t*, the quiet check at *t*), is put as a zero-argument
call on one FIFO per device, and the device's capture thread runs the calls in that order. The
times are taken on the loop when the event happened, not when the thread gets to it, and audio
and gap fills go through the same queue, so the timeline gets exactly the sequence of writes it
got when everything ran on the loop. Only the moment they land is later. ``threaded=False``
(the default: ``listen`` and sinks that only keep bytes in memory) runs each call at once, on
the caller's thread.

Overflow (the loop never waits for the thread): the queue holds at most ``MAX_QUEUED_PACKETS``
notifications, about a minute of audio, far more than any disk stall we know of. A batch that
does not fit is dropped, counted in ``LinkStats.capture_dropped`` and logged at most once a
minute as an error. For Omi the next batch then shows an index gap, which is concealed and
counted as lost frames like a radio loss, so the timeline keeps its length. Timeline events
carry no audio and are never refused: they are a few a second and a few bytes each.

Whatever the sink hands on from ``write`` (finished conversations) is handed on from the
capture thread; the daemon's outbox and ASR worker take calls from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from bridge.core.stats import LinkStats

_LOGGER = logging.getLogger(__name__)

MAX_QUEUED_PACKETS = 6000
"""Notifications the queue holds: 60 s at 100 notifications/s (Omi sends 50–100 a second,
omi-device.md §5.1). Memory: a few hundred kilobytes of Opus."""

DROP_LOG_SECONDS = 60.0
"""A stalled disk would fail every batch; one journal line a minute says it."""

Work = Callable[[], object]


class Capture:
    """Runs one device's audio work in order, on a thread of its own or inline."""

    def __init__(self, label: str = "device", *, threaded: bool = False,
                 stats: LinkStats | None = None, max_packets: int = MAX_QUEUED_PACKETS) -> None:
        self.label = label
        self.threaded = threaded
        self.stats = stats
        self.max_packets = max_packets
        self.dropped = 0
        """Notifications refused because the queue was full."""
        self.peak_packets = 0
        """Most notifications ever waiting at once (how far behind the thread fell)."""
        self._queue: collections.deque[tuple[Work, int]] = collections.deque()
        self._queued_packets = 0
        self._busy = False
        self._closing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last_drop_log = -DROP_LOG_SECONDS

    # ------------------------------------------------------------------ the loop's side

    def submit(self, work: Work, *, packets: int = 0) -> bool:
        """Run ``work`` after everything submitted before it. ``packets``: notifications it
        carries (0 for timeline events). Returns False if it was dropped (queue full)."""
        if not self.threaded:
            self._run(work)
            return True
        with self._cond:
            if packets and self._queued_packets + packets > self.max_packets:
                self._drop(packets)
                return False
            self._queue.append((work, packets))
            self._queued_packets += packets
            self.peak_packets = max(self.peak_packets, self._queued_packets)
            self._cond.notify_all()
        return True

    @property
    def queued_packets(self) -> int:
        return self._queued_packets

    def _drop(self, packets: int) -> None:
        self.dropped += packets
        if self.stats is not None:
            self.stats.capture_dropped += packets
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_SECONDS:
            self._last_drop_log = now
            _LOGGER.error("%s: audio processing is more than %d notifications behind (is the disk "
                          "or the CPU stalled?); dropping audio (%d notifications so far)",
                          self.label, self.max_packets, self.dropped)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the thread (threaded mode; idempotent)."""
        if not self.threaded or self._thread is not None:
            return
        with self._cond:
            self._closing = False
        self._thread = threading.Thread(target=self._main, name=f"capture {self.label}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish everything submitted so far, then end the thread. False if ``timeout`` passed
        first (the thread then finishes on its own)."""
        thread = self._thread
        if thread is None:
            return True
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far has run. False if ``timeout`` passed first."""
        if self._thread is None:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue and not self._closing:
                    cond.wait()
                if not self._queue:
                    return
                work, packets = self._queue.popleft()
                self._busy = True
            self._run(work)
            with cond:
                self._queued_packets -= packets
                self._busy = False
                if not self._queue:
                    cond.notify_all()

    def _run(self, work: Work) -> None:
        try:
            work()
        except Exception:  # a bug downstream must not stop the stream
            _LOGGER.exception("%s: audio processing failed", self.label)
