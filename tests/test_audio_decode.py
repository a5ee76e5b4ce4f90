"""Decoding keeps the timeline exact: every frame the pendant made becomes its length of audio."""

from __future__ import annotations

import numpy as np
import opuslib
import pytest

from bridge.audio.codecs import make_decoder
from bridge.audio.stream import AudioStream
from bridge.audio.timeline import CATCH_UP_MARGIN, AudioTimeline
from bridge.core.errors import UnknownCodecError
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.stats import LinkStats


class ListSink:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def write(self, pcm: np.ndarray) -> None:
        assert pcm.dtype == np.int16
        self.parts.append(pcm.copy())

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def firmware_encoder() -> opuslib.Encoder:
    """The firmware's settings (omi-device.md §4): CELT-only low delay, 32 kbit/s VBR, complexity 3."""
    enc = opuslib.Encoder(SAMPLE_RATE, 1, opuslib.APPLICATION_RESTRICTED_LOWDELAY)
    enc.bitrate = 32000
    enc.complexity = 3
    return enc


def opus_frames(n_samples: int, seconds: float = 1.0) -> list[bytes]:
    enc, pcm = firmware_encoder(), tone(seconds)
    return [enc.encode(pcm[i:i + n_samples].tobytes(), n_samples)
            for i in range(0, len(pcm) - n_samples + 1, n_samples)]


@pytest.mark.parametrize(("codec", "n"), [(20, 160), (21, 320)])
def test_opus_frames_and_concealment_keep_the_device_length(codec, n):
    frames = opus_frames(n)
    dec = make_decoder(codec, "pendant")
    out = [dec.decode(f) for f in frames[:10]] + [dec.conceal(3)] + [dec.decode(f) for f in frames[13:]]
    total = sum(len(x) for x in out)
    assert total == len(frames) * n
    assert np.abs(out[0]).max() > 0  # real audio, not silence


def test_corrupt_opus_frame_is_concealed_and_counted():
    dec = make_decoder(21)
    good = opus_frames(320)[0]
    assert len(dec.decode(good)) == 320
    assert len(dec.decode(b"\xff\xff\xff")) == 320  # an invalid packet: PLC, same length
    assert dec.decode_errors == 1


@pytest.mark.parametrize(("codec", "payload", "samples"), [
    (0, np.arange(160, dtype="<i2").tobytes(), 160),
    (1, np.arange(80, dtype="<i2").tobytes(), 160),
    (10, bytes(range(160)), 160),
    (11, bytes(range(80)), 160),
])
def test_pcm_and_mulaw_codecs_come_out_at_16_khz(codec, payload, samples):
    dec = make_decoder(codec)
    out = [dec.decode(payload) for _ in range(5)] + [dec.conceal(2)] + [dec.flush()]
    assert sum(len(x) for x in out) == 7 * samples


def test_mulaw_matches_g711():
    dec = make_decoder(10)
    out = dec.decode(bytes([0x00, 0x7F, 0x80, 0xFF]))
    assert out.tolist() == [-32124, 0, 32124, 0]


def test_unknown_codec_names_the_byte_and_the_device():
    with pytest.raises(UnknownCodecError) as err:
        make_decoder(0x42, "kitchen pendant")
    assert "66" in str(err.value) and "kitchen pendant" in str(err.value)
    assert "21" in err.value.hint


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_outage_becomes_wall_clock_silence_and_the_timeline_meets_wall_clock_again():
    sink, clock = ListSink(), Clock()
    tl = AudioTimeline(sink, clock=clock)
    frame = np.ones(320, np.int16)
    for _ in range(50):  # one second of audio
        clock.t += 0.02
        tl.audio(frame)
    assert tl.samples_written == SAMPLE_RATE
    tl.link_down()
    for _ in range(5):  # five seconds without link, caught up every second
        clock.t += 1.0
        tl.catch_up()
        assert tl.samples_written == round((clock.t - CATCH_UP_MARGIN - tl.anchor) * SAMPLE_RATE)
    clock.t += 0.5
    tl.audio(frame)  # reconnected: the frame starts 20 ms before it arrived
    assert tl.samples_written == round((clock.t - tl.anchor) * SAMPLE_RATE)
    assert len(sink.pcm) == tl.samples_written
    tl.finish(clock.t + 1.0)
    assert tl.samples_written == round((clock.t + 1.0 - tl.anchor) * SAMPLE_RATE)


def test_stream_counts_what_the_user_sees():
    sink, stats = ListSink(), LinkStats()
    tl = AudioTimeline(sink)
    s = AudioStream(21, tl, stats, mtu=247, device="pendant")
    frames = opus_frames(320)
    for i, f in enumerate(frames):
        if i in (5, 6):
            continue
        p = bytes([i & 0xFF, i >> 8, 0]) + f
        s.push(p)
        if i == 9:
            s.push(p)
    s.close()
    assert stats.packets == len(frames) - 2 + 1
    assert (stats.frames, stats.lost_frames, stats.duplicates) == (len(frames) - 2, 2, 1)
    assert len(sink.pcm) == len(frames) * 320 == stats.samples_written


def test_8_khz_pcm_is_upsampled_without_clicks_at_frame_edges():
    import soxr

    t = np.arange(8000) / 8000
    x = (8000 * np.sin(2 * np.pi * 300 * t)).astype("<i2")
    dec = make_decoder(1)
    out = np.concatenate([dec.decode(x[i:i + 80].tobytes()) for i in range(0, 8000, 80)] + [dec.flush()])
    whole = soxr.resample(x, 8000, SAMPLE_RATE)
    assert len(out) == len(whole) == SAMPLE_RATE
    assert np.abs(out[200:-200].astype(int) - whole[200:-200]).max() < 100  # same as one pass
