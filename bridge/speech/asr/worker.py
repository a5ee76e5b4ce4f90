"""Transcription: one worker thread shared by every device, in front of one ASR backend.

The per-device pipelines hand over *windows*: consecutive utterances of one device packed up to
``[asr] window_seconds`` (each Whisper call encodes 30 s whatever it holds, performance-notes.md
§4); while windows queue, a call takes utterances of several of the same device's windows up to
that size (``AsrWorker._take``). The worker reads their audio from the spool and hands it to the backend
(``[asr] backend``: faster-whisper here, ``local.py``, or a Wyoming server, ``wyoming.py``),
which returns segments per utterance.

Jobs name spool files, not audio: a backlog waits on disk, not in RAM.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import AsrOptions
from bridge.core.errors import BridgeError
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool
from bridge.speech.asr.backend import AsrBackend, AsrUnavailable, RawSegment
from bridge.speech.asr.choose import make_backend
from bridge.speech.asr.health import WorkerHealth
from bridge.speech.asr.local import BUNDLED_MODEL, load_model, resolve_model, transcribe_window
from bridge.speech.asr.segments import GAP_SECONDS, packed_seconds

__all__ = ["BUNDLED_MODEL", "GAP_SECONDS", "AsrWorker", "Piece", "RawSegment", "Window",
           "WorkerHealth", "load_model", "resolve_model", "transcribe_window"]

_LOGGER = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
"""A window the backend could not transcribe (``AsrError``: server down, timed out, garbled
answer) goes back to the head of the queue and its audio stays on disk; the worker tries again
after a back-off that doubles per failure up to this, and resets on the first success. One
reconnect attempt per 15 s costs nothing, and speech waits on disk, not in memory."""


@dataclass
class Piece:
    """One spooled utterance inside a window."""

    key: str
    path: Path
    samples: int
    attempts: int = 0
    """Failed transcriptions of this utterance (not counting an engine that could not be reached)."""


@dataclass
class Window:
    """Consecutive utterances of one device, transcribed in one call."""

    device: str
    pieces: list[Piece]
    on_done: Callable[[Window, list[list[RawSegment]], str | None], None]
    """Called on the worker thread with segments per piece and the detected language."""
    submitted_at: float = field(default_factory=time.monotonic)
    alone: bool = False
    """Transcribe in a call of its own: a call it shared with other windows failed, and which
    window's audio caused it is found out by trying each alone."""
    on_give_up: Callable[[Window, str], None] | None = None
    """Called on the worker thread with a one-utterance window that failed ``[asr] max_attempts``
    times, and the last error: its owner sets the audio aside (never deletes it). Without it the
    window is retried for ever."""

    @property
    def seconds(self) -> float:
        return sum(p.samples for p in self.pieces) / SAMPLE_RATE


class AsrWorker:
    """The transcription thread (one per window the backend may take at once: ``max_in_flight``,
    1 for the local model). Pipelines ``submit`` windows; results go to their callbacks.

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
        self._threads: list[threading.Thread] = []
        self._running = False
        self._in_hand: dict[int, tuple[Window, float]] = {}
        """Windows in transcription (by id) and when each was taken."""
        self._retry_at = 0.0
        self._backoff = 0.0
        self.retry_max_seconds = RETRY_MAX_SECONDS
        self._failing_since: datetime | None = None
        self.given_up = 0
        """Utterances handed to ``on_give_up`` since start."""
        self._on_drained: list[Callable[[], None]] = []
        self.windows_done = 0
        self.calls = 0
        """Backend calls made: queued windows share a call while they fit in one."""
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
        self._threads = [threading.Thread(target=self._run, name=f"asr-worker-{i}", daemon=True)
                         for i in range(max(1, self.backend.max_in_flight))]
        self._thread = self._threads[0]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the window in hand and stop; queued windows stay spooled for ``recover``."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.backend is not None:
            self.backend.close()

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

    def _queued_seconds(self) -> float:
        """Speech in windows waiting for a call (under the lock)."""
        return sum(w.seconds for w in self._queue)

    def backlog_seconds(self) -> float:
        with self._cond:
            return self._queued_seconds() + sum(w.seconds for w, _ in self._in_hand.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in transcription; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_hand, timeout)

    def health(self) -> WorkerHealth:
        with self._cond:
            since = [t for _, t in self._in_hand.values()]
            busy = time.monotonic() - min(since) if since else 0.0
            retrying = self._backoff > 0
            failing_since = self._failing_since
            retry_in = self._retry_at - time.monotonic() if failing_since else 0.0
            waiting = sum(len(w.pieces) for w in self._queue)
            waiting += sum(len(w.pieces) for w, _ in self._in_hand.values())
        return WorkerHealth(alive=bool(self._threads) and all(t.is_alive() for t in self._threads),
                            busy_seconds=busy, backlog_seconds=self.backlog_seconds(),
                            windows_done=self.windows_done, errors=self.errors,
                            last_error=self.last_error, retrying=retrying,
                            failing_since=failing_since, retry_in=max(0.0, retry_in),
                            utterances_waiting=waiting, given_up=self.given_up)

    def healthy(self) -> bool:
        """For a systemd watchdog: the thread lives and is not stuck on one window."""
        h = self.health()
        return h.alive and not h.stuck

    def _take(self) -> list[Window]:
        """The head window and what of the queued windows fits with it in one call (under the
        lock).

        Whisper encodes 30 s whatever a call holds (performance-notes.md §4), so while windows
        queue, the head window's device's later windows share its call up to ``[asr]
        window_seconds``: a queued window is taken whole, or its first utterances are and the rest
        stays queued in its place; once one is cut, no later one joins, so the device's utterances
        keep their order. Other devices' windows never join: two pendants in one room hear the
        same sentence, and Whisper decoding it twice in one call drops it as a repetition loop
        (both conversations came out empty)."""
        batch = [self._queue.popleft()]
        if batch[0].alone or not getattr(self.backend, "merges", False):
            return batch
        room = self.options.window_seconds - packed_seconds([p.samples for p in batch[0].pieces])
        skipped: set[str] = set()
        at = 0
        while at < len(self._queue) and room > GAP_SECONDS:
            window = self._queue[at]
            n = 0
            if not window.alone and window.device == batch[0].device and window.device not in skipped:
                while n < len(window.pieces) and GAP_SECONDS + packed_seconds(
                        [p.samples for p in window.pieces[:n + 1]]) <= room:
                    n += 1
            if n < len(window.pieces):
                skipped.add(window.device)
            if not n:
                at += 1
                continue
            room -= GAP_SECONDS + packed_seconds([p.samples for p in window.pieces[:n]])
            if n == len(window.pieces):
                batch.append(window)
                del self._queue[at]
            else:
                batch.append(dataclasses.replace(window, pieces=window.pieces[:n]))
                self._queue[at] = dataclasses.replace(window, pieces=window.pieces[n:])
                at += 1
        return batch

    def _may_start(self) -> bool:
        """Whether this thread may start a call now (under the lock). Beside a call in progress,
        a merging backend starts another only when more speech waits than one call can hold:
        otherwise the queued windows are worth more packed into the next call (each call encodes
        30 s) than transcribed at once on the second core."""
        if not self._in_hand or not getattr(self.backend, "merges", False):
            return True
        return self._queued_seconds() >= self.options.window_seconds

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:  # a window to take, and no back-off after a failure in force
                    if not self._running:
                        return
                    pause = self._retry_at - time.monotonic()
                    if self._queue and pause <= 0 and self._may_start():
                        break
                    # No timeout while the queue waits on the call in progress: its end wakes us.
                    self._cond.wait(pause if self._queue and pause > 0 else None)
                batch = self._take()
                taken = time.monotonic()
                for window in batch:
                    self._in_hand[id(window)] = (window, taken)
                drained: list[Callable[[], None]] = []
                if not self._queue:
                    drained, self._on_drained = self._on_drained, []
            for callback in drained:
                try:
                    callback()
                except Exception:
                    _LOGGER.exception("%s: a drained-queue callback failed", batch[0].device)
            retry = list(batch)
            try:
                retry = self._process(batch)
            finally:
                with self._cond:
                    for window in batch:
                        del self._in_hand[id(window)]
                    self._queue.extendleft(reversed(retry))
                    self._cond.notify_all()

    def _process(self, batch: list[Window]) -> list[Window]:
        """Transcribe the windows in one call and hand each on; returns those to retry (the
        backend failed, or a transcript could not be stored)."""
        pieces = [p for w in batch for p in w.pieces]
        result: list[list[RawSegment]] = [[] for _ in pieces]
        language = None
        try:
            audios = [spool.read_pcm(p.path)[:p.samples] for p in pieces]
            cpu0, wall0 = time.process_time(), time.monotonic()
            assert self.backend is not None
            result, language = self.backend.transcribe(audios)
            with self._cond:
                self.cpu_seconds += time.process_time() - cpu0
                self.busy_seconds += time.monotonic() - wall0
                self.speech_seconds += sum(len(a) for a in audios) / SAMPLE_RATE
                self.windows_done += len(batch)
                self.calls += 1
                if self._backoff:
                    _LOGGER.info("transcription works again (%s)", self.backend.describe())
                self._backoff = 0.0
                self._failing_since = None
        except AsrUnavailable as exc:  # the engine, not the audio: keep it on disk, try again later
            first = self._back_off(exc.message)
            log = _LOGGER.warning if first else _LOGGER.debug
            log("%s: %s; %d window(s) wait on disk, next try in %.1f s", batch[0].device, exc.message,
                len(self._queue) + len(self._in_hand), self._backoff)
            return batch
        except Exception as exc:  # maybe the audio (corrupt spool file), out of memory, a bug
            if len(batch) > 1:
                self._failed_shared(batch, exc)
            else:
                self._failed(batch[0], exc)
            return []
        retry: list[Window] = []
        at = 0
        for window in batch:
            mine = result[at:at + len(window.pieces)]
            at += len(window.pieces)
            try:
                window.on_done(window, mine, language)
            except OSError as exc:
                # The transcript could not be stored (disk full): the audio is still spooled, so
                # it is transcribed again later rather than its text lost.
                self._back_off(f"cannot store the transcript: {exc}")
                _LOGGER.warning("%s: cannot store the transcript of %d utterance(s): %s; retrying",
                                window.device, len(window.pieces), exc)
                retry.append(window)
            except Exception:
                _LOGGER.exception("%s: handling a transcription result failed", window.device)
        return retry

    def _failed_shared(self, batch: list[Window], exc: Exception) -> None:
        """A call several windows shared failed: each is tried again alone, no attempt counted
        (which window's audio failed is not known yet)."""
        error = exc.message if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}"
        first = self._back_off(error)
        with self._cond:
            self._queue.extend(dataclasses.replace(w, alone=True) for w in batch)
            self._cond.notify_all()
        _LOGGER.log(logging.WARNING if first else logging.INFO,
                    "transcription failed for %d windows in one call (%s); retrying each alone",
                    len(batch), error, exc_info=first and not isinstance(exc, BridgeError))

    def _back_off(self, error: str) -> bool:
        """Count a failure and pause the worker; True for the first failure in a row."""
        with self._cond:
            self.errors += 1
            self.last_error = error
            first = not self._backoff
            if self._failing_since is None:
                self._failing_since = datetime.now(UTC)
            self._backoff = min(max(self._backoff * 2, RETRY_MIN_SECONDS), self.retry_max_seconds)
            self._retry_at = time.monotonic() + self._backoff
            return first

    def _failed(self, window: Window, exc: Exception) -> None:
        """A failure that may be the audio's: nothing is handed back, so the audio stays spooled.
        A window of several utterances is retried one utterance per window (one corrupt file must
        not hold back the others); one utterance that failed ``[asr] max_attempts`` times is given
        to ``on_give_up``, which sets it aside."""
        error = exc.message if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}"
        first = self._back_off(error)
        give_up: Window | None = None
        with self._cond:
            for piece in window.pieces:
                piece.attempts += 1
            if len(window.pieces) > 1:
                retry = [dataclasses.replace(window, pieces=[p], alone=True) for p in window.pieces]
            elif window.pieces[0].attempts >= self.options.max_attempts and window.on_give_up:
                give_up, retry = window, []
            else:
                retry = [window]
            # Behind the other windows: what does transcribe is not held up by what does not.
            self._queue.extend(retry)
            self._cond.notify_all()
        _LOGGER.log(logging.WARNING if first else logging.INFO,
                    "%s: transcription failed for %d utterance(s) (%s); their audio stays on disk, "
                    "retrying in %.1f s", window.device, len(window.pieces), error, self._backoff,
                    exc_info=first and not isinstance(exc, BridgeError))
        if give_up is not None and give_up.on_give_up is not None:
            try:
                give_up.on_give_up(give_up, error)
                self.given_up += 1
            except Exception:
                _LOGGER.exception("%s: cannot set aside an utterance that does not transcribe; "
                                  "it stays in the spool and is retried", window.device)
                self.submit(give_up)
