"""From one window's audio to segments per utterance, whichever backend transcribed it.

The utterances of a window are glued with a short silence into one array; text that comes back
with window times is placed on the utterance(s) it covers, clipped to each, so no segment spans
the silence between utterances.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from bridge.core.pcm import SAMPLE_RATE

GAP_SECONDS = 0.4
"""Silence glued between utterances of one window: enough for Whisper to break segments there.
0.2 s (with the utterances' own 0.2 s pads) once made Whisper drop a whole stretch of the bench
corpus on one loss pattern (WER 19.8 % against 2.1 %); 0.1 s ran words across utterances."""
COMPRESSION_RATIO_MAX = 2.4
"""Above this gzip ratio a segment is a repetition loop (faster-whisper's own fallback threshold)."""
REPEAT_MAX = 4
"""The same 1–3 word phrase this many times in a row is runaway repetition, not speech."""
MIN_SEGMENT_SECONDS = 0.01
"""Segments are never zero-length (the API rejects end <= start, omi-api.md §4.2)."""
MIN_SHARE_SECONDS = 0.15
"""A segment reaching less than this into an utterance is not split onto it (timestamp slop)."""
SNAP_WORDS = 2
"""How far a proportional word split may move to land after punctuation."""

Bounds = list[tuple[float, float]]
"""(start, end) of each utterance in the glued window, in seconds."""


def glue(audios: Sequence[np.ndarray]) -> tuple[np.ndarray, Bounds]:
    """Int16 utterances → one float32 window (GAP_SECONDS of silence between) and their bounds."""
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    bounds: Bounds = []
    pos = 0
    for i, pcm in enumerate(audios):
        if i:
            parts.append(gap)
            pos += len(gap)
        parts.append(pcm.astype(np.float32) / 32768.0)
        bounds.append((pos / SAMPLE_RATE, (pos + len(pcm)) / SAMPLE_RATE))
        pos += len(pcm)
    if not pos:
        return np.zeros(0, dtype=np.float32), bounds
    return np.concatenate(parts), bounds


def packed_seconds(samples: Sequence[int]) -> float:
    """Length of utterances of these sample counts once glued into one window."""
    return (sum(samples) + int(GAP_SECONDS * SAMPLE_RATE) * max(0, len(samples) - 1)) / SAMPLE_RATE


def runaway(text: str) -> bool:
    words = text.lower().split()
    for n in (1, 2, 3):
        run = 1
        for i in range(n, len(words) - n + 1):
            if words[i:i + n] == words[i - n:i]:
                run += 1
                if run >= REPEAT_MAX:
                    return True
            elif i % n == 0:
                run = 1
    return False


def split_words(words: list[str], shares: list[float], snap: int = SNAP_WORDS) -> list[list[str]]:
    """Split ``words`` into consecutive runs in proportion to ``shares``; a boundary moves to a
    nearby word ending a clause (Whisper punctuates pauses) when there is one."""
    total = sum(shares)
    cuts = [0]
    acc = 0.0
    for share in shares[:-1]:
        acc += share
        cut = round(acc / total * len(words))
        near = [c for c in range(cut - snap, cut + snap + 1)
                if cuts[-1] < c < len(words) and words[c - 1][-1:] in ",.;:!?"]
        if near:
            cut = min(near, key=lambda c: abs(c - cut))
        cuts.append(min(max(cut, cuts[-1]), len(words)))
    cuts.append(len(words))
    return [words[a:b] for a, b in itertools.pairwise(cuts)]


def map_to_pieces(text: str, s: float, e: float, bounds: Bounds,
                  snap: int = SNAP_WORDS) -> list[tuple[int, str, float, float]]:
    """Place a segment (window times) on the utterance(s) it covers, clipped to each, so no
    segment spans the silence between utterances. A segment covering several utterances is
    split by words in proportion to the speech it covers in each (no word timestamps: they cost
    ≈ 12 % per call, performance-notes §4)."""
    overlaps = [min(e, b1) - max(s, b0) for b0, b1 in bounds]
    covered = [i for i, o in enumerate(overlaps) if o >= MIN_SHARE_SECONDS]
    if not covered:  # inside a glue gap, or too short to tell: the utterance that overlaps most
        best = max(range(len(bounds)), key=lambda i: overlaps[i])
        if overlaps[best] <= 0:
            best = min(range(len(bounds)),
                       key=lambda i: min(abs(s - bounds[i][1]), abs(e - bounds[i][0])))
        covered = [best]
    runs = split_words(text.split(), [max(overlaps[i], MIN_SHARE_SECONDS) for i in covered], snap)
    out = []
    for idx, words in zip(covered, runs, strict=True):
        if not words:
            continue
        b0, b1 = bounds[idx]
        start = min(max(s, b0), b1 - MIN_SEGMENT_SECONDS)
        end = max(min(e, b1), start + MIN_SEGMENT_SECONDS)
        out.append((idx, " ".join(words), start, end))
    return out
