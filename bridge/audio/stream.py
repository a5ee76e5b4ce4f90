"""One connection's audio path: notifications → frames → 16 kHz PCM → timeline.

Built fresh on every connect (new depacketizer, new decoder: omi-device.md §6.2); the timeline
and the ``LinkStats`` outlive connections. ``push_batch`` takes the several notifications one
batched read delivers (bridge/link/notify.py) and writes their audio to the timeline in one
piece, so per-write costs downstream (VAD framing, spooling) are paid once per batch, not once
per frame. In the daemon it runs on the device's capture thread (bridge/audio/capture.py), with
the arrival time the event loop took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from bridge.audio.codecs import Decoder, make_decoder
from bridge.audio.depacketize import Depacketizer, Event, Frame, max_fragment_for_mtu
from bridge.audio.timeline import AudioTimeline
from bridge.core.stats import LinkStats

_LOGGER = logging.getLogger(__name__)

_STAMP_SECONDS = 1.0
"""``LinkStats.last_audio_at`` is refreshed at most this often (it is for status, not timing)."""


class AudioStream:
    """Feeds one connection's audio notifications into the device timeline."""

    def __init__(self, codec: int, timeline: AudioTimeline, stats: LinkStats, *,
                 mtu: int | None = None, device: str = "device") -> None:
        self.decoder: Decoder = make_decoder(codec, device)
        self.depacketizer = Depacketizer(max_fragment_for_mtu(mtu))
        self.timeline = timeline
        self.stats = stats
        self.device = device
        self.last_packet_at: float | None = None
        """Monotonic time of the last notification (for the watchdog)."""
        self._counted = (0, 0, 0, 0, 0, 0)
        self._audio_stamped = -_STAMP_SECONDS

    def push(self, packet: bytes | bytearray) -> None:
        now = time.monotonic()
        self.last_packet_at = now
        self._handle(self.depacketizer.push(packet), now)

    def push_batch(self, packets: Sequence[bytes | bytearray], at: float) -> None:
        """Several notifications in arrival order, the last of which had arrived by ``at``."""
        self.last_packet_at = at
        push = self.depacketizer.push
        events: list[Event] = []
        for packet in packets:
            events += push(packet)
        self._handle(events, at)

    def close(self, at: float | None = None) -> None:
        """The connection ended (at monotonic time ``at``, default now): decode a held frame and
        the resampler's lookahead."""
        now = time.monotonic() if at is None else at
        self._handle(self.depacketizer.flush(), now)
        tail = self.decoder.flush()
        if len(tail):
            self.timeline.audio(tail, at=now)
        self._sync_stats()

    def _handle(self, events: Sequence[Event], now: float) -> None:
        decoder = self.decoder
        pcms = [decoder.decode(e.payload) if isinstance(e, Frame) else decoder.conceal(e.frames)
                for e in events]
        if len(pcms) == 1:
            self.timeline.audio(pcms[0], at=now)
        elif pcms:
            self.timeline.audio(np.concatenate(pcms), at=now)
        self._sync_stats()
        if events and now - self._audio_stamped >= _STAMP_SECONDS:
            self._audio_stamped = now
            self.stats.last_audio_at = datetime.now(UTC)

    def _sync_stats(self) -> None:
        """Add this connection's new counts to the link-lifetime stats."""
        d = self.depacketizer
        errors = self.decoder.decode_errors
        now = (d.packets, d.frames, d.lost_frames, d.duplicates, d.malformed, errors)
        p0, f0, l0, du0, m0, e0 = self._counted
        new_errors = errors - e0
        s = self.stats
        s.packets += d.packets - p0
        # A frame libopus refuses was concealed: it counts as lost (and malformed), not decoded.
        s.frames += d.frames - f0 - new_errors
        s.lost_frames += d.lost_frames - l0 + new_errors
        s.duplicates += d.duplicates - du0
        s.malformed += d.malformed - m0 + new_errors
        s.samples_written = self.timeline.samples_written
        self._counted = now
