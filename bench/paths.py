"""Audio through the device paths, without the radio: packets in, the bridge's timeline out.

- ``omi_packets``: PCM → the pendant's notifications (``omi_bridge_sim.omi``'s firmware encoder and
  ``transport.c`` framing), with notifications lost in the air like ``OmiModel.loss`` (the index
  is consumed, the packet never arrives).
- ``omi_decode``: the bridge's per-connection audio path (``AudioStream``: reassembly, Opus
  decode, concealment, exact timeline).
- ``naive_decode``: the peer, Omi's community Python SDK as omi-device.md §12 describes it: strip
  the 3-byte header, decode each notification on its own with ``frame_size=960``, no
  reassembly, no index tracking, no concealment, a decode error yields nothing. (Its per-packet
  DC removal and auto-gain, §12.4, are left out: they only change levels, and the comparison is
  about what reaches the timeline.)
- ``frame_packets`` / ``frame_decode``: Frame glasses' numbered raw-PCM packets (our Lua app,
  8-bit 16 kHz by default) through ``FramePcmDecoder``.
"""

from __future__ import annotations

import random
import struct

import numpy as np
from omi_bridge_sim.omi import HEADER_BYTES, INDEX_MODULO, FrameEncoder, fragment

from bridge.audio.codecs import CODEC_OPUS_20MS, OPUS_MAX_FRAME_SAMPLES
from bridge.audio.frame_pcm import SEQ_MODULO, FramePcmDecoder
from bridge.audio.stream import AudioStream
from bridge.audio.timeline import AudioTimeline
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stats import LinkStats

LOSS = 0.02
"""Notification loss of the lossy conditions (the 2 % the link tests use)."""
MTU_NORMAL = 247
"""The ATT MTU bleak gets from BlueZ with the pendant: one notification per frame."""
MTU_SMALL = 48
"""Small MTU: 20 ms frames (~80 bytes at 32 kbit/s) span two or three notifications, so
reassembly matters and one lost fragment loses the whole frame. Below the firmware's 100
(it would send nothing, omi-device.md §5.2): the simulator's ``min_mtu`` knob, as in the tests."""
FRAME_CHUNK_BYTES = 240
"""Frame app packet payload at the usual MTU (bridge/devices/frame/app.lua MAX_CHUNK)."""


class PcmCollector:
    """A ``PcmSink`` keeping the timeline in memory."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def write(self, pcm: np.ndarray, /) -> None:
        self.parts.append(np.asarray(pcm, dtype=np.int16).copy())

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)


def omi_packets(pcm: np.ndarray, *, codec: int = CODEC_OPUS_20MS, mtu: int = MTU_NORMAL,
                loss: float = 0.0, seed: int = 1) -> tuple[list[bytes], int, int]:
    """(notifications that arrive, frames produced, samples the device produced)."""
    enc = FrameEncoder(codec)
    fs = enc.spec.frame_samples_16k
    n_frames = len(pcm) // fs
    rng = random.Random(seed)
    out: list[bytes] = []
    idx = 0
    for n in range(n_frames):
        frame = enc.encode(pcm[n * fs:(n + 1) * fs])
        for sub, piece in enumerate(fragment(frame, mtu)):
            if not (loss and rng.random() < loss):
                out.append(struct.pack("<HB", idx, sub) + piece)
            idx = (idx + 1) % INDEX_MODULO
    return out, n_frames, n_frames * fs


def omi_decode(notifications: list[bytes], *, codec: int = CODEC_OPUS_20MS,
               mtu: int = MTU_NORMAL, sink: object | None = None) -> np.ndarray:
    """The bridge's path: reassembly, decode, concealment → 16 kHz timeline."""
    collector = PcmCollector()
    stream = AudioStream(codec, AudioTimeline(sink or collector), LinkStats(), mtu=mtu)  # type: ignore[arg-type]
    for p in notifications:
        stream.push(p)
    stream.close()
    return collector.pcm()


def naive_decode(notifications: list[bytes]) -> tuple[np.ndarray, int]:
    """The community SDK's decoding (§12): (PCM, decode errors)."""
    import opuslib

    dec = opuslib.Decoder(SAMPLE_RATE, 1)
    parts: list[np.ndarray] = []
    errors = 0
    for p in notifications:
        try:
            raw = dec.decode(bytes(p[HEADER_BYTES:]), OPUS_MAX_FRAME_SAMPLES)
        except opuslib.OpusError:
            errors += 1  # the SDK prints the error and returns b""
            continue
        parts.append(np.frombuffer(raw, dtype="<i2"))
    pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    return pcm, errors


def frame_packets(pcm: np.ndarray, *, loss: float = LOSS, seed: int = 1,
                  chunk: int = FRAME_CHUNK_BYTES) -> list[tuple[int, bytes]]:
    """Frame's 8-bit 16 kHz microphone stream (the int16 sample's high byte, frame.md §6) cut
    into numbered packets; lost packets never arrive."""
    data = (pcm >> 8).astype(np.int8).tobytes()
    rng = random.Random(seed)
    out = []
    for n, i in enumerate(range(0, len(data) - chunk + 1, chunk)):
        if not (loss and rng.random() < loss):
            out.append((n % SEQ_MODULO, data[i:i + chunk]))
    return out


def frame_decode(packets: list[tuple[int, bytes]]) -> np.ndarray:
    dec = FramePcmDecoder(SAMPLE_RATE, 8)
    parts = [dec.feed(seq, payload) for seq, payload in packets]
    parts.append(dec.flush())
    return np.concatenate(parts)
