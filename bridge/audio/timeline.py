"""The exact audio timeline: device audio plus wall-clock silence for link outages.

Sample ``n`` written to the sink is ``n / 16000`` s after the *anchor*, the wall-clock moment of
the first audio sample (arrival time of the first frame minus its duration).

Rules that keep the total length equal to the wall-clock span (within about one frame):

- **Connected:** decoded and concealed audio is written as it comes, sample-exact with what the
  device produced (the device's clock, not ours, paces it; no silence is inserted for jitter).
- **Link down (``link_down()``):** a gap opens. ``catch_up()``, called about once a second by the
  link, writes silence up to ``now − CATCH_UP_MARGIN`` so downstream stages (VAD, conversation
  close) see time pass during a long outage. The margin keeps us from writing past the moment
  the next real audio will claim.
- **First audio after the gap:** the timeline meets wall clock again: silence is written up to
  the new frame's start (arrival − frame duration) measured from the anchor, then the audio.
  If we were already past that point (can only happen by less than the margin plus network
  jitter), nothing is inserted.
- **Connected but quiet (``quiet()``):** newer Omi firmware may stop notifying during silence
  while staying connected (AAD, omi-device.md §5.2). Once no audio has arrived for longer than
  ``QUIET_SECONDS`` (well above BLE jitter and the firmware's retries), ``quiet()``, called about
  once a second by the link, opens a gap exactly like a link outage and fills silence up to
  ``now − CATCH_UP_MARGIN``. The next audio closes the gap with the "first audio after the gap"
  rule above, so a pause costs no timer per frame and no reconnect.
- **Late audio after a fill (no double count):** if audio that the device produced during the
  quiet spell arrives late (delivery stalled, not paused: the index continues either way, so we
  cannot tell in advance), its start lies before the end of the silence already written. Audio
  is never dropped: it is appended, and the timeline then runs ahead of wall clock by the
  overlap, counted in ``ahead_samples``. Every later fill aims at the wall-clock position from
  the anchor, never at "timeline end + gap", so the next gap (quiet or outage) is shortened by
  exactly that overlap: the double-counted stretch is paid back, and the total length meets wall
  clock again at the next gap. The overlap is bounded by what the device can hold back (its
  64-frame transmit queue, 1.28 s of 20 ms frames, §5.3).
- **``finish(at)``:** pads silence up to ``at`` (e.g. ``listen --seconds`` end).

Times come from ``time.monotonic()`` (immune to NTP steps); ``started_at`` is the matching
wall-clock ``datetime`` for conversation timestamps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np

from bridge.core.pcm import SAMPLE_RATE, PcmSink

CATCH_UP_MARGIN = 0.25
"""Seconds behind wall clock that silence filling stops during an outage: more than BLE
delivery latency (~10–50 ms), small enough that a conversation's gap timer barely notices."""

QUIET_SECONDS = 2.0
"""A connected device that sent no audio for longer than this is treated as paused (AAD,
omi-device.md §5.2). Longer than what a delivery stall can hand back late: the firmware's
64-frame transmit queue holds 1.28 s of 20 ms frames (§5.3), so a shorter silence may be audio
still on its way, not a pause; short enough that conversation timers see time pass."""

_SILENCE_CHUNK = SAMPLE_RATE
"""Silence is written in chunks of at most one second so sinks never get a huge array."""


class AudioTimeline:
    """Writes one device's audio and outage silence into a ``PcmSink``."""

    def __init__(self, sink: PcmSink, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._clock = clock
        self.anchor: float | None = None
        """Monotonic time of sample 0; None until the first audio."""
        self.started_at: datetime | None = None
        """Wall-clock time of sample 0."""
        self.samples_written = 0
        self.silence_samples = 0
        """Samples of outage and quiet-spell silence (not concealment) written."""
        self.ahead_samples = 0
        """Samples of late audio that overlapped silence already written (see the module rules)."""
        self.last_audio_at: float | None = None
        """Monotonic time of the last ``audio()`` call."""
        self._gap_open = False

    @property
    def started(self) -> bool:
        return self.anchor is not None

    @property
    def seconds(self) -> float:
        return self.samples_written / SAMPLE_RATE

    def audio(self, pcm: np.ndarray, *, at: float | None = None) -> None:
        """Device audio (decoded or concealed) that arrived at monotonic time ``at`` (default now)."""
        if len(pcm) == 0:
            return
        now = self._clock() if at is None else at
        if self.anchor is None:
            self.anchor = now - len(pcm) / SAMPLE_RATE
            self.started_at = datetime.now(UTC) - timedelta(seconds=len(pcm) / SAMPLE_RATE)
        elif self._gap_open:
            start = now - len(pcm) / SAMPLE_RATE
            if not self._silence_to(start):
                self.ahead_samples += max(0, self.samples_written
                                          - round((start - self.anchor) * SAMPLE_RATE))
        self._gap_open = False
        self.last_audio_at = now
        self._write(pcm)

    def link_down(self) -> None:
        """The link dropped (or is being remade): open a gap that wall clock will fill."""
        self._gap_open = True

    def catch_up(self, now: float | None = None) -> int:
        """During a gap, write silence up to wall clock minus the margin; returns samples written."""
        if not self._gap_open or self.anchor is None:
            return 0
        now = self._clock() if now is None else now
        return self._silence_to(now - CATCH_UP_MARGIN)

    def quiet(self, now: float | None = None) -> int:
        """While connected: if no audio came for ``QUIET_SECONDS``, open a gap and write silence
        up to wall clock minus the margin, as during an outage; returns samples written."""
        if self.anchor is None or self.last_audio_at is None:
            return 0
        now = self._clock() if now is None else now
        if not self._gap_open:
            if now - self.last_audio_at <= QUIET_SECONDS:
                return 0
            self._gap_open = True
        return self._silence_to(now - CATCH_UP_MARGIN)

    def finish(self, at: float | None = None) -> int:
        """Pad with silence up to monotonic time ``at`` (default now); returns samples written."""
        if self.anchor is None:
            return 0
        return self._silence_to(self._clock() if at is None else at)

    def _silence_to(self, when: float) -> int:
        assert self.anchor is not None
        target = round((when - self.anchor) * SAMPLE_RATE)
        missing = target - self.samples_written
        written = 0
        while missing > 0:
            n = min(missing, _SILENCE_CHUNK)
            self._write(np.zeros(n, dtype=np.int16))
            self.silence_samples += n
            written += n
            missing -= n
        return written

    def _write(self, pcm: np.ndarray) -> None:
        self._sink.write(pcm)
        self.samples_written += len(pcm)
