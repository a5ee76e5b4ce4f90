"""Streaming voice activity detection: Silero (faster-whisper's ONNX copy) frame by frame.

``get_speech_timestamps`` in faster-whisper is offline (it resets the LSTM state per call), so a
live stream drives the ONNX model itself, 32 ms frames in order, carrying the recurrent state and
the 64-sample context between calls (performance-notes.md §3: probabilities bit-identical to the
batched call). The notes' 58 µs per frame were on a Zen 5 core with AVX-512; the bench VM
(family 25, AVX2 only) needs ≈ 110–130 µs for the model alone and ≈ 170 µs with one frame per
``run``, so the pipeline hands over ``BATCH_FRAMES`` at a time and a level gate skips frames of
near-digital silence.

``Endpointer`` turns the per-frame probabilities into utterances with hysteresis, minimum
silence, padding, minimum speech and a maximum length (cut at the quietest frame).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.config import VadOptions
from bridge.core.pcm import SAMPLE_RATE

FRAME_SAMPLES = 512
"""Silero v5/v6 at 16 kHz takes 512-sample frames (faster_whisper/vad.py, SileroVADModel)."""
CONTEXT_SAMPLES = 64
"""The model also sees the last 64 samples of the previous frame (same source)."""
STATE_SHAPE = (1, 1, 128)
"""Shape of the LSTM ``h``/``c`` inputs and ``hn``/``cn`` outputs of silero_vad_v6.onnx."""
VAD_MODEL_FILE = "silero_vad_v6.onnx"
"""Bundled in faster_whisper/assets (faster-whisper ≥ 1.1)."""

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
BATCH_FRAMES = 4
"""Frames per ONNX call. The model's first input axis is time (faster_whisper/vad.py feeds whole
files that way) and its LSTM carries h/c along it, so the probabilities are bit-identical to one
frame per call, while the fixed cost of a run (Python ↔ ORT, ~40 small kernels) is paid once:
measured 127 → 76 µs per frame (best of 5) on the bench VM. 4 frames delay VAD decisions by
128 ms, nothing next to the 0.5 s of silence that ends an utterance."""
FULL_SCALE = 32768.0
"""int16 full scale: dBFS levels here are frame RMS relative to it."""
GATE_HANGOVER_FRAMES = 8
"""Quiet frames still shown to the model before the level gate closes (256 ms): the short lulls
inside and between words keep their usual probabilities, and the state the model holds when the
gate closes has already settled on silence. Closing it after 2–3 quiet frames once the model reads
them as silence (p < 0.1 / 0.05) skipped 25 / 23 % instead of 21 % of the capture bench's frames
(5 / 1 % less VAD CPU) but cost words on the corpus 40 dB down over Opus (WER 4.2 → 21 / 5.5 %)."""


def level_floor(min_level_dbfs: float | None) -> float:
    """Mean square (int16 units²) at or below which a frame may skip the model; 0 = only zeros."""
    if min_level_dbfs is None:
        return 0.0
    return float((FULL_SCALE * 10 ** (min_level_dbfs / 20)) ** 2)


@functools.lru_cache(maxsize=1)
def _session() -> Any:  # an onnxruntime.InferenceSession (onnxruntime ships no types)
    """One ONNX session per process, shared by every stream (the state lives in ``SileroVad``)."""
    import importlib.util

    import onnxruntime

    # The model file ships inside faster-whisper; find it without importing the package, which
    # would load CTranslate2 into a bridge whose speech is transcribed on a Wyoming server.
    spec = importlib.util.find_spec("faster_whisper")
    assert spec is not None and spec.origin is not None, "faster-whisper is not installed"

    opts = onnxruntime.SessionOptions()
    # One thread, no pool: VAD runs beside capture and Whisper, and a pool's spinning workers would
    # burn the other core between frames. Session options (optimisation level, arena, execution
    # mode) were tried and made no difference beyond the machine's noise; batching frames did.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    path = os.path.join(os.path.dirname(spec.origin), "assets", VAD_MODEL_FILE)
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class SileroVad:
    """Speech probability of successive 512-sample frames of one stream.

    Level gate: once frames have stayed at or below ``min_level_dbfs`` (frame RMS, dBFS) for
    ``GATE_HANGOVER_FRAMES``, further quiet frames skip the model and read as silence
    (probability 0). The recurrent state is kept as it was: after the hangover it already
    describes silence, so the next loud frame is judged as if the model had seen the quiet; a
    reset would restart it from the all-zero state it starts files with, which on the corpus moved
    utterance edges more (measured: 0.40 s vs 0.03 s of a 120 s lossy Opus stream). Digital
    silence (a link gap written as zeros) still resets the state at once: the audio before and
    after a gap are not one signal.
    """

    def __init__(self, min_level_dbfs: float | None = None) -> None:
        self._session = _session()
        self._floor = level_floor(min_level_dbfs)
        self._quiet_run = 0
        self.frames = 0
        """Frames seen."""
        self.gated = 0
        """Frames that skipped the model (digital silence, or quiet past the hangover)."""
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._zero_state = True

    def __call__(self, frame: np.ndarray) -> float:
        """``frame``: 512 int16 samples."""
        return float(self.probs(np.asarray(frame).reshape(1, FRAME_SAMPLES))[0])

    def probs(self, frames: np.ndarray) -> np.ndarray:
        """``frames``: (n, 512) int16, consecutive. One model run per stretch of ungated frames."""
        n = len(frames)
        self.frames += n
        out = np.zeros(n, dtype=np.float32)
        audio = frames.astype(np.float32)
        power = np.einsum("ij,ij->i", audio, audio) / FRAME_SAMPLES
        run = np.ones(n, dtype=bool)
        for k in range(n):
            if power[k] > self._floor:
                self._quiet_run = 0
            else:
                self._quiet_run += 1
                run[k] = power[k] > 0 and self._quiet_run <= GATE_HANGOVER_FRAMES
        audio *= 1 / FULL_SCALE
        i = 0
        while i < n:
            if not run[i]:
                self.gated += 1
                if power[i] == 0 and not self._zero_state:
                    self.reset()
                # The next frame's context is the true previous audio (zeros after a link gap).
                self._context = audio[i, -CONTEXT_SAMPLES:]
                i += 1
                continue
            j = i + 1
            while j < n and run[j]:
                j += 1
            batch = np.empty((j - i, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
            batch[:, CONTEXT_SAMPLES:] = audio[i:j]
            batch[0, :CONTEXT_SAMPLES] = self._context
            batch[1:, :CONTEXT_SAMPLES] = audio[i:j - 1, -CONTEXT_SAMPLES:]
            prob, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
            out[i:j] = prob.reshape(-1)
            self._context = audio[j - 1, -CONTEXT_SAMPLES:]
            self._zero_state = False
            i = j
        return out


LEVEL_MARGIN_DB = 10.0
"""LevelVad: a frame this far above the noise floor counts as speech."""
LEVEL_FLOOR_START_DBFS = -60.0
LEVEL_FLOOR_RISE_DB = 0.05
"""Per frame (1.6 dB/s): the floor follows a louder room slowly, speech (seconds long) barely moves
it, and any quieter frame lowers it at once (a minimum tracker)."""
LEVEL_ABSOLUTE_MIN_DBFS = -50.0
"""Quieter than this is never speech, whatever the floor (a digitally quiet room)."""


class LevelVad:
    """Speech "probability" 1.0 / 0.0 from frame level against a tracked noise floor.

    The fallback where Silero cannot run: onnxruntime publishes no wheels for 32-bit ARM, so on
    32-bit Pi OS (remote ASR, ``[asr] backend = "wyoming"``) the bridge installs without it.
    Utterance edges are coarser than Silero's and steady noise louder than the margin reads as
    speech; the Endpointer's hysteresis, padding and minimum lengths apply as usual. Same
    interface as ``SileroVad``.
    """

    def __init__(self, min_level_dbfs: float | None = None) -> None:
        self._min_db = max(LEVEL_ABSOLUTE_MIN_DBFS, min_level_dbfs or LEVEL_ABSOLUTE_MIN_DBFS)
        self._floor_db = LEVEL_FLOOR_START_DBFS
        self.frames = 0
        self.gated = 0

    def reset(self) -> None:
        self._floor_db = LEVEL_FLOOR_START_DBFS

    def __call__(self, frame: np.ndarray) -> float:
        return float(self.probs(np.asarray(frame).reshape(1, FRAME_SAMPLES))[0])

    def probs(self, frames: np.ndarray) -> np.ndarray:
        audio = frames.astype(np.float32)
        power = np.einsum("ij,ij->i", audio, audio) / FRAME_SAMPLES
        levels = 10 * np.log10(np.maximum(power, 1e-3) / FULL_SCALE**2)
        out = np.zeros(len(frames), dtype=np.float32)
        for k, db in enumerate(levels):
            self._floor_db = min(float(db), self._floor_db + LEVEL_FLOOR_RISE_DB)
            if db > max(self._floor_db + LEVEL_MARGIN_DB, self._min_db):
                out[k] = 1.0
        self.frames += len(frames)
        return out


def silero_available() -> bool:
    """onnxruntime and faster-whisper's bundled Silero model are installed (``local-asr``)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "faster_whisper"))


def make_vad(min_level_dbfs: float | None = None) -> SileroVad | LevelVad:
    """Silero when it is installed, else the level detector (logged once per process)."""
    if silero_available():
        return SileroVad(min_level_dbfs)
    _warn_level_vad()
    return LevelVad(min_level_dbfs)


@functools.lru_cache(maxsize=1)
def _warn_level_vad() -> None:
    logging.getLogger(__name__).warning(
        "Silero VAD is not installed (onnxruntime / faster-whisper, the local-asr extra): finding "
        "speech by level instead, with coarser utterance edges")


@dataclass(frozen=True)
class VadEvent:
    """``kind``: "start" (speech began; ``sample`` = start incl. pre-pad), "end" (utterance over;
    ``sample`` = end incl. post-pad; ``speech_samples`` = speech without pads), "cut" (an over-long
    utterance ends at ``sample`` and the next one begins there)."""

    kind: str
    sample: int
    speech_samples: int = 0


class Endpointer:
    """Hysteresis segmenter over frame probabilities, in samples of the stream.

    Speech starts when p ≥ threshold, and may end once p < neg_threshold; it ends after
    ``min_silence`` of that. "end" is only reported once the post-pad audio has arrived, so the
    caller always holds the whole utterance. Utterances with less speech than ``min_speech`` are
    still reported (the caller discards them: ``speech_samples``).
    """

    def __init__(self, options: VadOptions) -> None:
        self.o = options
        self._pad = int(options.pad_seconds * SAMPLE_RATE)
        self._min_silence = int(options.min_silence_seconds * SAMPLE_RATE)
        self._max_len = int(options.max_utterance_seconds * SAMPLE_RATE)
        self.in_speech = False
        self._start = 0  # utterance start incl. pre-pad
        self._speech_start = 0
        self._temp_end: int | None = None  # first quiet sample of a possible end
        self._pending_end: tuple[int, int] | None = None  # (end incl. pad, speech samples)
        self._probs: list[float] = []  # per frame of the current utterance, for the cut
        self._probs_from = 0

    @property
    def min_speech_samples(self) -> int:
        return int(self.o.min_speech_seconds * SAMPLE_RATE)

    def push(self, frame_start: int, prob: float) -> list[VadEvent]:
        """Feed the probability of the frame starting at ``frame_start``; return what happened."""
        events: list[VadEvent] = []
        frame_end = frame_start + FRAME_SAMPLES
        if self._pending_end is not None and frame_end >= self._pending_end[0]:
            end, speech = self._pending_end
            self._pending_end = None
            events.append(VadEvent("end", end, speech))
        if not self.in_speech:
            if prob >= self.o.threshold:
                last_end = events[-1].sample if events else 0
                self.in_speech = True
                self._speech_start = frame_start
                self._start = max(0, frame_start - self._pad, last_end)
                self._temp_end = None
                self._probs = [prob]
                self._probs_from = frame_start
                if self._pending_end is not None:
                    # Speech resumed inside the post-pad: end the previous utterance right here.
                    end, speech = self._pending_end
                    self._pending_end = None
                    self._start = frame_start
                    events.append(VadEvent("end", frame_start, speech))
                events.append(VadEvent("start", self._start))
            return events
        self._probs.append(prob)
        if prob >= self.o.threshold:
            self._temp_end = None
        elif prob < self.o.neg_threshold and self._temp_end is None:
            self._temp_end = frame_start
        if self._temp_end is not None and frame_end - self._temp_end >= self._min_silence:
            self.in_speech = False
            end = self._temp_end + self._pad
            speech = self._temp_end - self._speech_start
            if frame_end >= end:
                events.append(VadEvent("end", end, speech))
            else:
                self._pending_end = (end, speech)
            return events
        if frame_end - self._start >= self._max_len:
            cut = self._quietest_cut()
            events.append(VadEvent("cut", cut, cut - self._speech_start))
            self._start = self._speech_start = cut
            keep = (cut - self._probs_from) // FRAME_SAMPLES
            self._probs = self._probs[keep:]
            self._probs_from = cut
            if self._temp_end is not None and self._temp_end < cut:
                self._temp_end = cut
        return events

    def resume(self, start: int) -> None:
        """Continue an utterance that began at stream sample ``start`` (before this stream, after
        a restart): the next quiet spell ends it as if the stream had never been interrupted."""
        self.in_speech = True
        self._start = self._speech_start = start
        self._temp_end = None
        self._pending_end = None
        self._probs = []
        self._probs_from = 0

    def _quietest_cut(self) -> int:
        """Frame boundary with the lowest speech probability in the second half of the utterance
        (so neither piece is tiny); ties go to the latest frame."""
        half = len(self._probs) // 2
        tail = self._probs[half:]
        idx = half + min(range(len(tail)), key=lambda i: (tail[i], -i))
        return self._probs_from + idx * FRAME_SAMPLES

    def flush(self, total_samples: int) -> list[VadEvent]:
        """The stream ended at ``total_samples``: end whatever is open."""
        if self._pending_end is not None:
            end, speech = self._pending_end
            self._pending_end = None
            return [VadEvent("end", min(end, total_samples), speech)]
        if self.in_speech:
            self.in_speech = False
            end_speech = self._temp_end if self._temp_end is not None else total_samples
            return [VadEvent("end", min(total_samples, end_speech + self._pad),
                             end_speech - self._speech_start)]
        return []
