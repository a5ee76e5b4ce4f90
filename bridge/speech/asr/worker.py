"""Transcription: one worker thread shared by every device, in front of one ASR backend.

The per-device pipelines hand over *windows*: consecutive utterances of one device packed up to
``[asr] window_seconds`` (each Whisper call encodes 30 s whatever it holds, performance-notes.md
§4). The worker reads their audio from the spool and hands it to the backend (``[asr] backend``:
faster-whisper here, ``local.py``, or a Wyoming server, ``wyoming.py``), which returns segments
per utterance.

Jobs name spool files, not audio: a backlog waits on disk, not in RAM.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import AsrOptions
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool
from bridge.speech.asr.backend import AsrBackend, RawSegment, make_backend
from bridge.speech.asr.local import BUNDLED_MODEL, load_model, resolve_model, transcribe_window
from bridge.speech.asr.segments import GAP_SECONDS

__all__ = ["BUNDLED_MODEL", "GAP_SECONDS", "AsrWorker", "Piece", "RawSegment", "Window",
           "load_model", "resolve_model", "transcribe_window"]

_LOGGER = logging.getLogger(__name__)

STUCK_SECONDS = 300.0
"""One window (≤ 29 s of audio) taking longer than this means the worker is stuck, even on a Pi 4
(≈ 3–4 s per call there, performance-notes.md §6)."""


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

    def __init__(self, options: AsrOptions, model: Any = None,
                 backend: AsrBackend | None = None) -> None:
        """``model``: an already loaded local model (tests); ``backend``: instead of the one
        ``[asr] backend`` names."""
        self.options = options
        self.model = model
        self.backend = backend
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
        """Ready the backend (load the model, or ask the server what it runs) and start the
        thread. Idempotent."""
        if self._thread and self._thread.is_alive():
            return
        if self.backend is None:
            self.backend = make_backend(self.options, self.model)
        self.backend.start()
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
            assert self.backend is not None
            result, language = self.backend.transcribe(audios)
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
