"""Streaming VAD and endpointing: what counts as an utterance, and what never does."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bridge.config import Config, VadOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.pipeline import SpeechPipeline
from bridge.speech.vad import BATCH_FRAMES, FRAME_SAMPLES, GATE_HANGOVER_FRAMES, Endpointer, SileroVad

CORPUS = Path(__file__).resolve().parent / "data"
"""Speech clips with reference transcripts, in the repo (tests/data/NOTICE.md)."""
F = FRAME_SAMPLES


def run_probs(probs: list[float], options: VadOptions | None = None) -> list[tuple[str, int, int]]:
    ep = Endpointer(options or VadOptions())
    events = []
    for i, p in enumerate(probs):
        events += [(e.kind, e.sample, e.speech_samples) for e in ep.push(i * F, p)]
    events += [(e.kind, e.sample, e.speech_samples) for e in ep.flush(len(probs) * F)]
    return events


def frames(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE / F)


def test_an_utterance_is_padded_and_ends_after_the_minimum_silence() -> None:
    probs = [0.0] * frames(1) + [0.9] * frames(1) + [0.0] * frames(2)
    events = run_probs(probs)
    speech_start = frames(1) * F
    speech_end = (frames(1) + frames(1)) * F
    pad = int(0.2 * SAMPLE_RATE)
    assert [e[0] for e in events] == ["start", "end"]
    assert events[0][1] == speech_start - pad
    assert events[1][1] == speech_end + pad
    assert events[1][2] == speech_end - speech_start


def test_hysteresis_keeps_one_utterance_through_a_dip_and_a_short_pause() -> None:
    # 0.4 (between neg_threshold and threshold) does not end speech; 0.3 s of quiet is shorter
    # than min_silence (0.5 s), so the two words stay one utterance.
    probs = ([0.0] * 10 + [0.9] * 20 + [0.4] * 20 + [0.9] * 10 + [0.1] * frames(0.3)
             + [0.9] * 10 + [0.0] * frames(2))
    assert [e[0] for e in run_probs(probs)] == ["start", "end"]


def test_a_long_pause_makes_two_utterances() -> None:
    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * frames(1) + [0.9] * 20 + [0.0] * frames(1)
    assert [e[0] for e in run_probs(probs)] == ["start", "end", "start", "end"]


def test_an_utterance_longer_than_the_maximum_is_cut_at_its_quietest_point() -> None:
    options = replace(VadOptions(), max_utterance_seconds=10.0)
    probs = [0.0] * 5 + [0.9] * frames(20) + [0.0] * frames(2)
    quiet = 5 + frames(7)  # a short breath, too short to end the utterance
    probs[quiet] = 0.2
    events = run_probs(probs, options)
    kinds = [e[0] for e in events]
    assert kinds.count("cut") >= 1 and kinds[0] == "start" and kinds[-1] == "end"
    cut = next(e for e in events if e[0] == "cut")
    assert cut[1] == quiet * F
    bounds = [e[1] for e in events]
    assert all(b - a <= 10 * SAMPLE_RATE for a, b in itertools.pairwise(bounds))


def test_digital_silence_and_quiet_noise_read_as_no_speech() -> None:
    vad = SileroVad()
    assert vad(np.zeros(F, dtype=np.int16)) == 0.0
    rng = np.random.default_rng(1)
    assert 0.0 <= vad((rng.normal(0, 300, F)).astype(np.int16)) < 0.5


def _corpus_stream(gain_db: float) -> np.ndarray:
    from bridge.audio.files import decode_file as decode

    names = ["jfk.flac", "ljspeech/LJ001-0002.wav", "ljspeech/LJ001-0004.wav", "ljspeech/LJ001-0006.wav",
             "ljspeech/LJ001-0008.wav", "ljspeech/LJ001-0013.wav"]
    parts = []
    for name in names:
        parts += [np.zeros(SAMPLE_RATE, np.int16), decode(CORPUS / name)]
    audio = np.concatenate([*parts, np.zeros(SAMPLE_RATE, np.int16)]).astype(np.float64)
    return np.round(audio * 10 ** (gain_db / 20)).astype(np.int16)


def _utterance_mask(vad: SileroVad, audio: np.ndarray) -> np.ndarray:
    """Samples inside utterances (pads included), as the pipeline would spool them."""
    n = len(audio) // FRAME_SAMPLES * FRAME_SAMPLES
    frames = audio[:n].reshape(-1, FRAME_SAMPLES)
    probs = np.concatenate([vad.probs(frames[i:i + BATCH_FRAMES])
                            for i in range(0, len(frames), BATCH_FRAMES)])
    ep = Endpointer(VadOptions())
    events = [e for i, p in enumerate(probs) for e in ep.push(i * F, float(p))] + ep.flush(n)
    mask = np.zeros(n, dtype=bool)
    start = 0
    for e in events:
        if e.kind == "start":
            start = e.sample
        else:
            mask[start:e.sample] = True
            start = e.sample
    return mask


def test_the_level_gate_never_drops_quiet_speech() -> None:
    # Clean studio recordings 30 dB down (≈ -50 dBFS): their pauses sink below the -80 dBFS gate,
    # the words must not.
    audio = _corpus_stream(-30.0)
    plain = SileroVad(None)
    ungated = _utterance_mask(plain, audio)
    gate = SileroVad(VadOptions().min_level_dbfs)
    gated = _utterance_mask(gate, audio)
    assert gate.gated > plain.gated, "the gate skipped some quiet frames (besides digital silence)"
    assert ungated.sum() > 20 * SAMPLE_RATE
    missed = (ungated & ~gated).sum() / SAMPLE_RATE
    assert missed <= 0.01 * ungated.sum() / SAMPLE_RATE, f"{missed:.2f} s of speech lost to the gate"


def test_decoded_silence_skips_the_model_and_reads_as_silence() -> None:
    # What an Opus decoder makes of a silent room: ±1 LSB, ≈ -95 dBFS.
    rng = np.random.default_rng(3)
    hush = rng.integers(-1, 2, size=(64, F)).astype(np.int16)
    vad = SileroVad(VadOptions().min_level_dbfs)
    probs = vad.probs(hush)
    assert vad.gated == len(hush) - GATE_HANGOVER_FRAMES
    assert probs.max() < 0.5


def test_frames_in_batches_score_exactly_as_one_by_one() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(40 * F) / SAMPLE_RATE
    audio = (3000 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
             + rng.normal(0, 200, len(t))).astype(np.int16)
    audio[10 * F:14 * F] = 0  # a link gap inside a batch
    frames = audio.reshape(-1, F)
    one = SileroVad()
    singles = np.array([one(f) for f in frames], dtype=np.float32)
    batched = SileroVad()
    together = np.concatenate([batched.probs(frames[i:i + 7]) for i in range(0, len(frames), 7)])
    assert np.array_equal(singles, together)


def _feed_without_asr(tmp_path: Path, audio: np.ndarray) -> tuple[SpeechPipeline, AsrWorker, list]:
    worker = AsrWorker(Config().asr)  # never started: nothing may be sent to it
    found: list = []
    pipeline = SpeechPipeline("AA:BB:CC:DD:EE:01", Config(), worker, found.append, storage=tmp_path)
    for i in range(0, len(audio), 320):
        pipeline.write(audio[i:i + 320])
    pipeline.close()
    return pipeline, worker, found


def _music(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chords = [(261.6, 329.6, 392.0), (220.0, 277.2, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    out = np.zeros_like(t)
    for i, chord in enumerate(chords * int(seconds)):
        lo, hi = i * 0.5, (i + 1) * 0.5
        mask = (t >= lo) & (t < hi)
        for f in chord:
            out[mask] += np.sin(2 * np.pi * f * t[mask]) * np.exp(-3 * (t[mask] - lo))
    return (out / np.abs(out).max() * 8000).astype(np.int16)


@pytest.mark.parametrize("kind", ["silence", "noise", "hum", "music"])
def test_no_speech_makes_no_conversation_and_no_transcription(tmp_path: Path, kind: str) -> None:
    seconds = 20.0
    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(7)
    t = np.arange(n) / SAMPLE_RATE
    audio = {
        "silence": np.zeros(n, dtype=np.int16),
        "noise": rng.normal(0, 1500, n).astype(np.int16),
        "hum": (3000 * np.sin(2 * np.pi * 50 * t) + 1000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16),
        "music": _music(seconds),
    }[kind]
    pipeline, worker, found = _feed_without_asr(tmp_path, audio)
    assert found == []
    assert worker.backlog_seconds() == 0.0
    assert pipeline.backlog_seconds() == 0.0
    assert not any(p.is_dir() for p in pipeline.dir.iterdir()), "no conversation was opened"
