"""One Whisper window in one encoder pass, segment times from its timestamp tokens.

faster-whisper's ``transcribe`` runs Whisper's seek loop: when a window's text ends in a segment
Whisper did not close with a timestamp, it seeks back to the last timestamp and encodes the rest
again, a second full 30 s encoder pass and decode for the last few seconds. On glued windows of
utterances that happened in about half the calls and cost ≈ 0.45 s of a call's ≈ 1.25 s
(tiny.en int8, one thread, on the bench VM). A window here never exceeds 30 s, so the bridge
decodes it once and gives an unclosed last segment the window's end as its end: the utterance
bounds clip it anyway (``segments.map_to_pieces``).

What the seek loop also gives, the temperature fallback, is kept: a pass whose text looks like a
repetition loop or has a low average log-probability (faster-whisper's defaults) is transcribed
again by ``transcribe`` as before, which then samples at higher temperatures.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.core.pcm import SAMPLE_RATE

WINDOW_SECONDS = 30.0
"""Whisper's input: 3000 mel frames of 10 ms (performance-notes.md §4)."""
TIME_PRECISION = 0.02
"""Seconds per timestamp token step (Whisper's 20 ms)."""
MAX_INITIAL_TIMESTAMP = 1.0
"""The first timestamp may not be later than this (faster-whisper's default)."""
COMPRESSION_FALLBACK = 2.4
LOGPROB_FALLBACK = -1.0
"""faster-whisper's thresholds for decoding again at a higher temperature."""
REDO_SECONDS = 1.0
"""More audio than this after the last closed segment is decoded again (it may hold speech)."""
MAX_PASSES = 3


@dataclass(frozen=True)
class PassSegment:
    """A segment of the pass, with the fields ``local.transcribe_window`` reads."""

    text: str
    start: float
    end: float
    no_speech_prob: float
    compression_ratio: float


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def one_pass(model: Any, audio: np.ndarray, language: str,
             beam_size: int) -> list[PassSegment] | None:
    """Segments of ``audio`` (float32, ≤ 30 s); None when a pass needs faster-whisper's
    temperature fallback, or the audio is longer. Whisper sometimes ends its text early, with
    speech left after its last closed segment: that rest is decoded again (the seek loop's one
    useful case), from the last timestamp, at most ``MAX_PASSES`` times."""
    if len(audio) / SAMPLE_RATE > WINDOW_SECONDS:
        return None
    out: list[PassSegment] = []
    offset = 0.0
    for _ in range(MAX_PASSES):
        rest = audio[round(offset * SAMPLE_RATE):]
        found = _decode(model, rest, language, beam_size)
        if found is None:
            return None
        segments, covered = found
        out += [dataclasses.replace(s, start=s.start + offset, end=s.end + offset) for s in segments]
        if covered is None or len(rest) / SAMPLE_RATE - covered <= REDO_SECONDS:
            break
        offset += covered
    return out


def _decode(model: Any, audio: np.ndarray, language: str,
            beam_size: int) -> tuple[list[PassSegment], float | None] | None:
    """One encoder pass and decode: its segments and the end of its last closed one (None when
    the text ran to the end of the audio), or None for the temperature fallback."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    duration = len(audio) / SAMPLE_RATE
    features = pad_or_trim(model.feature_extractor(audio))
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                          language=language)
    prompt = model.get_prompt(tokenizer, [], without_timestamps=False)
    result = model.model.generate(
        model.encode(features), [prompt], beam_size=beam_size, max_length=model.max_length,
        return_scores=True, return_no_speech_prob=True, suppress_blank=True,
        suppress_tokens=list(get_suppressed_tokens(tokenizer, (-1,)) or ()),
        max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION))[0]
    tokens: list[int] = result.sequences_ids[0]
    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
    ratio = compression_ratio(tokenizer.decode(tokens).strip())
    if ratio > COMPRESSION_FALLBACK or avg_logprob < LOGPROB_FALLBACK:
        return None
    out: list[PassSegment] = []
    begin = tokenizer.timestamp_begin
    start = 0.0
    covered = 0.0
    text: list[int] = []

    def close(end: float) -> None:
        words = tokenizer.decode(text)
        if words.strip():
            out.append(PassSegment(words, start, max(end, start), result.no_speech_prob, ratio))

    for token in tokens:
        if token < begin:
            text.append(token)
            continue
        at = min((token - begin) * TIME_PRECISION, duration)
        if text:
            close(at)
            text = []
            covered = at
        start = at
    if text:  # Whisper left the last segment open: it runs to the end of the window
        close(duration)
        return out, None
    return out, covered
