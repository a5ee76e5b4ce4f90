"""Frame microphone PCM → the bridge's 16 kHz mono int16 timeline.

Frame sends raw PCM (frame.md §6): signed int8 (the high byte of the 16 kHz int16 sample, no
dither) or int16 little-endian, at 16 kHz or 8 kHz (every other sample, no anti-aliasing). Our
Lua app cuts the stream into packets of one fixed size and numbers them (see
``bridge/devices/frame/app.lua``), so a gap in the sequence numbers is an exact amount of audio
that this module replaces with silence, keeping sample ``n`` at ``n / 16000`` s.

Each (re)start of the microphone begins with a pop (frame.md §12, frame-codebase issue #280);
its first ``pop_seconds`` are muted rather than cut, so the timeline stays exact.
"""

from __future__ import annotations

import logging

import numpy as np

from bridge.core.pcm import SAMPLE_RATE

_LOGGER = logging.getLogger(__name__)

SEQ_MODULO = 1 << 16
"""The app's sequence number is 16 bits and wraps (devices/frame/app.lua, SEQ_MODULO)."""

MAX_GAP_PACKETS = 2_000
"""A forward jump larger than this (~30 s at 16 kB/s and 241-byte packets) is not loss but a
restarted app (or a corrupted header); it is counted as malformed and the sequence re-synced.
Half the sequence space is the hard limit: anything behind that is a late duplicate."""

POP_SECONDS = 0.2
"""Start-of-recording pop: ~1500 samples at 8 kHz ≈ 0.19 s (frame.md §12, issue #280)."""

SUPPORTED_RATES = (8_000, 16_000)
SUPPORTED_BIT_DEPTHS = (8, 16)
"""What ``frame.microphone.start`` accepts (frame.md §6, firmware microphone.c)."""


class FramePcmDecoder:
    """Turns numbered fixed-size PCM packets into 16 kHz int16 on an exact timeline.

    One decoder per microphone run: a new connection (and so a fresh app start with sequence
    numbers from 0 and a new pop) needs a new decoder; ``flush()`` the old one first.
    """

    def __init__(self, sample_rate: int, bit_depth: int, *, pop_seconds: float = POP_SECONDS,
                 device: str = "frame") -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise ValueError(f"Frame sample rate must be one of {SUPPORTED_RATES}, not {sample_rate}")
        if bit_depth not in SUPPORTED_BIT_DEPTHS:
            raise ValueError(f"Frame bit depth must be one of {SUPPORTED_BIT_DEPTHS}, not {bit_depth}")
        self.sample_rate = sample_rate
        self.bit_depth = bit_depth
        self.bytes_per_sample = bit_depth // 8
        self._device = device
        self._expected_seq: int | None = None
        self._packet_samples: int | None = None  # device-rate samples per packet
        self._mute_left = round(pop_seconds * SAMPLE_RATE)  # counted at 16 kHz, after resampling
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            # Streaming: the filter state carries across packets, so packet edges leave no clicks.
            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="int16", quality="HQ")
        self._closed = False
        self.packets = 0
        self.lost_packets = 0
        self.duplicates = 0
        self.malformed = 0
        self.samples_out = 0

    # -- format conversion ------------------------------------------------------------------

    def to_int16(self, payload: bytes) -> np.ndarray:
        """Device-rate int16 samples from one packet's PCM bytes."""
        if self.bit_depth == 8:
            # int8 is the int16 sample's high byte (frame.md §6): shift it back up.
            return np.frombuffer(payload, dtype=np.int8).astype(np.int16) << 8
        return np.frombuffer(payload, dtype="<i2").astype(np.int16)

    def _emit(self, pcm: np.ndarray, *, last: bool = False) -> np.ndarray:
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm, last=last)
        if self._mute_left and len(pcm):
            n = min(self._mute_left, len(pcm))
            pcm = pcm.copy()
            pcm[:n] = 0
            self._mute_left -= n
        self.samples_out += len(pcm)
        return pcm

    # -- packets ----------------------------------------------------------------------------

    def feed(self, seq: int, payload: bytes) -> np.ndarray:
        """One audio packet; returns the 16 kHz samples it completes (possibly empty).

        Lost packets before it come out as silence of their exact length, a late or repeated
        packet is counted and dropped, a packet of the wrong size is counted as malformed.
        """
        if self._closed:
            raise RuntimeError("FramePcmDecoder.feed after flush: make a new decoder per stream")
        if len(payload) == 0 or len(payload) % self.bytes_per_sample:
            self.malformed += 1
            return np.zeros(0, np.int16)
        samples = len(payload) // self.bytes_per_sample
        if self._packet_samples is None:
            self._packet_samples = samples
        elif samples != self._packet_samples:
            # The app only sends full packets; another size means a corrupted notification.
            self.malformed += 1
            return np.zeros(0, np.int16)
        parts: list[np.ndarray] = []
        if self._expected_seq is not None:
            ahead = (seq - self._expected_seq) % SEQ_MODULO
            if ahead >= SEQ_MODULO // 2:
                self.duplicates += 1
                return np.zeros(0, np.int16)
            if ahead > MAX_GAP_PACKETS:
                _LOGGER.warning("%s: sequence jumped by %d packets; re-syncing", self._device, ahead)
                self.malformed += 1
            elif ahead:
                self.lost_packets += ahead
                _LOGGER.debug("%s: %d packet(s) lost before #%d", self._device, ahead, seq)
                parts.append(self._emit(np.zeros(ahead * samples, np.int16)))
        self._expected_seq = (seq + 1) % SEQ_MODULO
        self.packets += 1
        parts.append(self._emit(self.to_int16(payload)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def flush(self) -> np.ndarray:
        """The resampler's tail; call once when the stream ends (link lost or closed)."""
        self._closed = True
        if self._resampler is None:
            return np.zeros(0, np.int16)
        out = self._emit(np.zeros(0, np.int16), last=True)
        self._resampler = None
        return out

    @property
    def seconds_in(self) -> float:
        """Audio the device produced so far (received + lost), in seconds."""
        if self._packet_samples is None:
            return 0.0
        return (self.packets + self.lost_packets) * self._packet_samples / self.sample_rate
