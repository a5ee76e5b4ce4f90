"""Codec frames → 16 kHz mono int16, with concealment that keeps the timeline exact.

One decoder per connection (``make_decoder``); a reconnect gets a fresh one so no state from
before the gap leaks into the new audio (omi-device.md §6.2).

Every decoder answers ``decode(payload)`` for a received frame and ``conceal(n)`` for ``n`` lost
frames; both return int16 samples at 16 kHz. ``conceal`` returns exactly the samples the device
produced for those frames, so the output length always equals the audio the device made:

- Opus: libopus packet-loss concealment, one ``decode(b"", frame_size)`` per lost frame, with
  the codec's real frame size (320 for codec 21, 160 for codec 20; never 960 — omi-device.md
  §6.2, §12.3). FEC is useless because the firmware encodes without it (§4).
- PCM / µ-law: silence of the last frame's length (there is nothing to interpolate from).

A frame libopus refuses (corrupt packet) is concealed like a lost one and counted in
``decode_errors``.
"""

from __future__ import annotations

import logging

import numpy as np

from bridge.core.errors import UnknownCodecError
from bridge.core.pcm import SAMPLE_RATE

_LOGGER = logging.getLogger(__name__)

# Codec ids: byte 0 of characteristic 19B10002 (omi-device.md §3; firmware config.h, Protocol.mdx).
CODEC_PCM16_16K = 0
"""PCM 16-bit LE, 16 kHz mono (Protocol.mdx; older firmware with CODEC_DIVIDER=1)."""
CODEC_PCM16_8K = 1
"""PCM 16-bit LE, 8 kHz mono (Protocol.mdx; the app's ``pcm8``)."""
CODEC_MULAW_16K = 10
"""µ-law 8-bit, 16 kHz mono (Protocol.mdx)."""
CODEC_MULAW_8K = 11
"""µ-law 8-bit, 8 kHz mono (Protocol.mdx)."""
CODEC_OPUS_10MS = 20
"""Opus 16 kHz mono, 160-sample frames (DevKit firmware ``config.h`` CODEC_PACKAGE_SAMPLES 160)."""
CODEC_OPUS_20MS = 21
"""Opus "FS320" 16 kHz mono, 320-sample frames (CV1 firmware ``config.h``, 160*2)."""

CODEC_NAMES = {
    CODEC_PCM16_16K: "pcm16 16 kHz",
    CODEC_PCM16_8K: "pcm16 8 kHz",
    CODEC_MULAW_16K: "µ-law 16 kHz",
    CODEC_MULAW_8K: "µ-law 8 kHz",
    CODEC_OPUS_10MS: "opus 10 ms",
    CODEC_OPUS_20MS: "opus 20 ms",
}

OPUS_FRAME_SAMPLES = {CODEC_OPUS_10MS: 160, CODEC_OPUS_20MS: 320}
"""Samples per Opus frame at 16 kHz (omi-device.md §3, §4)."""

OPUS_MAX_FRAME_SAMPLES = 960
"""Decode buffer bound for a *received* packet (60 ms at 16 kHz, the longest Opus frame). Only
a buffer size: libopus returns the packet's real duration. Never used for PLC (§12.3)."""

_RESAMPLE_CONTEXT = 32
"""Input samples of context on each side of a chunk when upsampling 8 → 16 kHz, so soxr sees
continuous signal across chunk edges (its edge handling otherwise clicks at every frame)."""


class Decoder:
    """Base: 16 kHz int16 output, exact concealment length."""

    codec: int
    frame_samples: int
    """Output samples (16 kHz) one lost frame is concealed with."""

    def __init__(self) -> None:
        self.decode_errors = 0

    def decode(self, payload: bytes) -> np.ndarray:
        raise NotImplementedError

    def conceal(self, frames: int) -> np.ndarray:
        return np.zeros(frames * self.frame_samples, dtype=np.int16)

    def flush(self) -> np.ndarray:
        """Samples still held back (only the 8 kHz resampler holds any)."""
        return np.zeros(0, dtype=np.int16)


class OpusDecoder(Decoder):
    """libopus through opuslib's ctypes binding, called directly: opuslib's ``Decoder.decode``
    copies every sample through a Python list, which tripled the cost per frame (bench/link.py)."""

    def __init__(self, codec: int) -> None:
        super().__init__()
        import ctypes

        import opuslib  # needs the system libopus (libopus0); imported only when a device uses Opus
        import opuslib.api.decoder as api

        self.codec = codec
        self.frame_samples = OPUS_FRAME_SAMPLES[codec]
        self._decoder = opuslib.Decoder(SAMPLE_RATE, 1)
        self._decode = api.libopus_decode
        self._buf = np.zeros(OPUS_MAX_FRAME_SAMPLES, dtype=np.int16)
        self._ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))

    def decode(self, payload: bytes) -> np.ndarray:
        n = self._decode(self._decoder.decoder_state, payload, len(payload), self._ptr,
                         OPUS_MAX_FRAME_SAMPLES, 0)
        if n < 0:  # OPUS_INVALID_PACKET, OPUS_CORRUPTED_DATA, ...
            self.decode_errors += 1
            return self.conceal(1)
        return self._buf[:n].copy()

    def conceal(self, frames: int) -> np.ndarray:
        if frames <= 0:
            return np.zeros(0, dtype=np.int16)
        out = np.empty(frames * self.frame_samples, dtype=np.int16)
        for i in range(frames):
            # No data asks libopus for PLC of exactly frame_size samples (opus_decode, len 0).
            n = self._decode(self._decoder.decoder_state, None, 0, self._ptr, self.frame_samples, 0)
            if n != self.frame_samples:  # cannot happen for a valid frame size; stay exact anyway
                self._buf[:self.frame_samples] = 0
            out[i * self.frame_samples:(i + 1) * self.frame_samples] = self._buf[:self.frame_samples]
        return out


class _LinearDecoder(Decoder):
    """PCM16 / µ-law, at 16 kHz directly or upsampled from 8 kHz."""

    def __init__(self, codec: int, *, mulaw: bool, rate: int) -> None:
        super().__init__()
        self.codec = codec
        self._mulaw = mulaw
        self._rate = rate
        self._factor = SAMPLE_RATE // rate
        # A typical frame until one arrives: 10 ms.
        self.frame_samples = SAMPLE_RATE // 100
        self._tail = np.zeros(0, dtype=np.int16)  # 8 kHz: the chunk held back for lookahead
        self._before = np.zeros(_RESAMPLE_CONTEXT, dtype=np.int16)

    def _to_samples(self, payload: bytes) -> np.ndarray:
        if self._mulaw:
            return _ULAW_TABLE[np.frombuffer(payload, dtype=np.uint8)]
        usable = len(payload) - len(payload) % 2
        return np.frombuffer(payload[:usable], dtype="<i2").astype(np.int16)

    def decode(self, payload: bytes) -> np.ndarray:
        samples = self._to_samples(payload)
        self.frame_samples = len(samples) * self._factor or self.frame_samples
        return self._emit(samples)

    def conceal(self, frames: int) -> np.ndarray:
        if frames <= 0:
            return np.zeros(0, dtype=np.int16)
        return self._emit(np.zeros(frames * self.frame_samples // self._factor, dtype=np.int16))

    def _emit(self, samples: np.ndarray) -> np.ndarray:
        if self._factor == 1:
            return samples
        # Upsample the *previous* chunk, now that we have context after it; output stays exactly
        # 2× the input over the stream (the last chunk comes out in flush()).
        held, self._tail = self._tail, samples
        if len(held) == 0:
            return np.zeros(0, dtype=np.int16)
        after = samples[:_RESAMPLE_CONTEXT]
        return self._upsample(held, after)

    def _upsample(self, held: np.ndarray, after: np.ndarray) -> np.ndarray:
        import soxr

        x = np.concatenate([self._before, held, after])
        y = soxr.resample(x, self._rate, SAMPLE_RATE)
        start = len(self._before) * self._factor
        out = y[start:start + len(held) * self._factor]
        self._before = np.concatenate([self._before, held])[-_RESAMPLE_CONTEXT:]
        return np.ascontiguousarray(out, dtype=np.int16)

    def flush(self) -> np.ndarray:
        if self._factor == 1 or len(self._tail) == 0:
            return np.zeros(0, dtype=np.int16)
        held, self._tail = self._tail, np.zeros(0, dtype=np.int16)
        return self._upsample(held, np.zeros(0, dtype=np.int16))


def _ulaw_table() -> np.ndarray:
    """G.711 µ-law byte → int16 (ITU-T G.711; same values as Python's audioop.ulaw2lin)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


_ULAW_TABLE = _ulaw_table()

SUPPORTED_CODECS = tuple(CODEC_NAMES)


def make_decoder(codec: int, device: str = "device") -> Decoder:
    """A fresh decoder for the codec byte the device reported; raises ``UnknownCodecError``."""
    if codec in OPUS_FRAME_SAMPLES:
        return OpusDecoder(codec)
    if codec == CODEC_PCM16_16K:
        return _LinearDecoder(codec, mulaw=False, rate=16_000)
    if codec == CODEC_PCM16_8K:
        return _LinearDecoder(codec, mulaw=False, rate=8_000)
    if codec == CODEC_MULAW_16K:
        return _LinearDecoder(codec, mulaw=True, rate=16_000)
    if codec == CODEC_MULAW_8K:
        return _LinearDecoder(codec, mulaw=True, rate=8_000)
    known = ", ".join(f"{c} ({n})" for c, n in CODEC_NAMES.items())
    raise UnknownCodecError(
        f"{device} reports audio codec {codec} (0x{codec:02X}), which omi-bridge cannot decode",
        f"supported codec bytes: {known}. Check the device's firmware version "
        "(`omi-bridge listen ADDRESS --json` shows it) and report it, or flash a firmware "
        "that streams Opus (codec 21 on the Omi CV1, 20 on the DevKit).")
