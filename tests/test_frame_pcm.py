"""Frame PCM → 16 kHz int16: formats, loss filling, the pop, the resampler across packets."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.audio.frame_pcm import SEQ_MODULO, FramePcmDecoder


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0, amp: int = 12_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def packets(pcm16k: np.ndarray, rate: int, bits: int, size: int) -> list[bytes]:
    """What the glasses send for a 16 kHz int16 source (frame.md §6: high byte, every other sample)."""
    src = pcm16k[:: 16_000 // rate]
    raw = (src >> 8).astype(np.int8).tobytes() if bits == 8 else src.astype("<i2").tobytes()
    return [raw[i:i + size] for i in range(0, len(raw) - size + 1, size)]


def run(dec: FramePcmDecoder, pkts: list[bytes], skip: set[int] = frozenset()) -> np.ndarray:
    out = [dec.feed(i % SEQ_MODULO, p) for i, p in enumerate(pkts) if i not in skip]
    out.append(dec.flush())
    return np.concatenate(out)


def test_8bit_is_the_high_byte_shifted_back():
    dec = FramePcmDecoder(16_000, 8, pop_seconds=0)
    out = dec.feed(0, bytes([0x7F, 0x80, 0x00, 0xFF]))
    assert out.tolist() == [0x7F00, -0x8000, 0, -256]


def test_16bit_is_little_endian():
    dec = FramePcmDecoder(16_000, 16, pop_seconds=0)
    out = dec.feed(0, bytes([0x34, 0x12, 0x00, 0x80]))
    assert out.tolist() == [0x1234, -0x8000]


@pytest.mark.parametrize(("rate", "bits"), [(16_000, 8), (8_000, 16), (8_000, 8), (16_000, 16)])
def test_every_format_keeps_the_source_length_and_shape(rate, bits):
    src = tone(2.0, freq=300.0)
    size = 240
    dec = FramePcmDecoder(rate, bits, pop_seconds=0)
    out = run(dec, packets(src, rate, bits, size))
    sent_seconds = len(packets(src, rate, bits, size)) * size / (bits // 8) / rate
    assert abs(len(out) - sent_seconds * 16_000) <= 2
    n = min(len(out), len(src)) - 400
    corr = np.corrcoef(out[200:n].astype(float), src[200:n].astype(float))[0, 1]
    assert corr > 0.98


def test_lost_packets_become_silence_of_their_exact_length():
    src = tone(1.0)
    pkts = packets(src, 16_000, 8, 240)
    dec = FramePcmDecoder(16_000, 8, pop_seconds=0)
    out = run(dec, pkts, skip={10, 11, 30})
    assert len(out) == len(pkts) * 240
    assert dec.lost_packets == 3
    assert not out[10 * 240:12 * 240].any()
    assert out[12 * 240:13 * 240].any()


def test_loss_at_8khz_keeps_the_16khz_timeline_exact():
    src = tone(2.0, freq=200.0)
    pkts = packets(src, 8_000, 16, 240)
    dec = FramePcmDecoder(8_000, 16, pop_seconds=0)
    out = run(dec, pkts, skip={5, 6, 7})
    assert dec.lost_packets == 3
    assert abs(len(out) - len(pkts) * 120 * 2) <= 2


def test_sequence_wrap_is_not_loss():
    dec = FramePcmDecoder(16_000, 8, pop_seconds=0)
    for seq in (65534, 65535, 0, 1):
        dec.feed(seq, bytes(10))
    assert dec.lost_packets == 0
    assert dec.packets == 4


def test_late_duplicate_is_dropped_and_malformed_counted():
    dec = FramePcmDecoder(16_000, 16, pop_seconds=0)
    assert len(dec.feed(0, bytes(20))) == 10
    assert len(dec.feed(0, bytes(20))) == 0
    assert len(dec.feed(1, bytes(21))) == 0  # odd byte count at 16-bit
    assert len(dec.feed(1, bytes(10))) == 0  # not the stream's packet size
    assert dec.duplicates == 1
    assert dec.malformed == 2


def test_start_of_recording_pop_is_muted_not_cut():
    pkts = packets(tone(1.0), 16_000, 8, 200)
    dec = FramePcmDecoder(16_000, 8, pop_seconds=0.2)
    out = run(dec, pkts)
    assert len(out) == 16_000
    assert not out[:3200].any()
    assert out[3200:3400].any()
