"""Per-device speech glue: audio timeline → VAD → utterances on disk → windows → conversations.

``SpeechPipeline`` is a ``PcmSink``: ``write`` runs the VAD and endpointer, appends speech to the
spool and packs finished utterances into windows for the shared ``AsrWorker``. It never waits for
transcription; results come back on the worker thread and are persisted with the conversation.
A conversation is handed to ``on_conversation`` once it is closed *and* fully transcribed.

Everything a restart needs is on disk, so ``recover()`` after a crash finishes interrupted
conversations (their ``finished_at`` is the end of the last speech heard) and hands them on once.
With ``resume=True`` (the daemon, for a device it still serves) the newest interrupted conversation
stays open instead when its last speech is younger than ``[conversation] gap_seconds``: the first
audio after the restart continues it on its own timeline (the time the daemon was down is a gap in
its segment times, not a shift), and the utterance the crash cut is continued rather than
transcribed as a fragment. A restart inside a sentence thus leaves no mark on what Omi receives.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from bridge.config import Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation, Segment
from bridge.speech import spool
from bridge.speech.asr.worker import GAP_SECONDS, AsrWorker, Piece, RawSegment, Window
from bridge.speech.conversations import OpenConversation, Utterance, live_session_id
from bridge.speech.diskguard import DiskGuard
from bridge.speech.handoff import HandOff
from bridge.speech.quarantine import QUARANTINE_DIR, set_aside
from bridge.speech.resume import CrashResume, OpenUtterance, Resumable
from bridge.speech.vad import BATCH_FRAMES, FRAME_SAMPLES, Endpointer, make_vad

_LOGGER = logging.getLogger(__name__)

SessionIdFn = Callable[[datetime, float], str]
"""(conversation started_at, its start in seconds on the stream) → client_session_id."""


class SpeechPipeline(CrashResume):
    """One device's audio timeline in, finished conversations out."""

    def __init__(self, device: str, config: Config, worker: AsrWorker,
                 on_conversation: Callable[[Conversation], None], *, source: str = "omi",
                 label: str = "", anchor: datetime | None = None,
                 session_id: SessionIdFn | None = None, storage: Path | None = None,
                 on_segments: Callable[[str, datetime, list[Segment]], None] | None = None) -> None:
        """``device``: a stable key (the BLE address) naming the spool folder and session ids.
        ``anchor``: wall-clock time of sample 0 (default: first write's time minus its length).
        ``storage``: state directory (default ``[storage] dir``).
        ``on_segments(client_session_id, started_at, segments)``: new text as soon as a window is
        transcribed (status, live view, benchmarks); called on the worker thread."""
        self.device = device
        self.label = label or device
        self.source = source
        self.config = config
        self.worker = worker
        self.on_conversation = on_conversation
        self.on_segments = on_segments
        self.anchor = anchor
        self._session_id = session_id or (lambda started, _offset: live_session_id(device, started))
        self.dir = spool.device_dir(storage or config.storage.path, device)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._vad = make_vad(config.vad.min_level_dbfs)
        self._ep = Endpointer(config.vad)
        self._lock = threading.RLock()
        self._rest = np.zeros(0, dtype=np.int16)
        self._batch = BATCH_FRAMES * FRAME_SAMPLES
        self.samples = 0
        """Samples of the timeline processed by the VAD so far."""
        self.speech_seconds = 0.0
        """Speech kept as utterances so far, pads included (metrics)."""
        self._ring: collections.deque[tuple[int, np.ndarray]] = collections.deque(
            maxlen=int(config.vad.pad_seconds * SAMPLE_RATE) // FRAME_SAMPLES + 2)
        self._utt: OpenUtterance | None = None
        self._conv: OpenConversation | None = None
        self._convs: dict[Path, OpenConversation] = {}
        self._window: list[Utterance] = []
        self._window_conv: OpenConversation | None = None
        self._flush_requested = False
        self._last_speech_end = 0  # stream sample
        self._min_speech = self._ep.min_speech_samples
        self._gap = int(config.conversation.gap_seconds * SAMPLE_RATE)
        self._max_conv = int(config.conversation.max_seconds * SAMPLE_RATE)
        self._flush_pause = int(config.asr.flush_pause_seconds * SAMPLE_RATE)
        self._window_max = int(config.asr.window_seconds * SAMPLE_RATE)
        self._glue = int(GAP_SECONDS * SAMPLE_RATE)
        self.disk = DiskGuard(self.dir, self.label)
        """Whether capture is paused for a full disk (``disk.paused``), and when it may resume."""
        self._handoff = HandOff(self.label, on_conversation)
        self.quarantine_dir = self.dir.parent.parent / QUARANTINE_DIR / self.dir.name
        """Utterances that never transcribed ([asr] max_attempts), kept for a person to look at."""
        self.quarantined = sum(1 for _ in self.quarantine_dir.glob("*/*.pcm"))
        """Utterances in the quarantine folder (this run's and earlier ones')."""
        self._resumable: Resumable | None = None

    @property
    def emitted(self) -> int:
        """Conversations handed on."""
        return self._handoff.emitted

    # ------------------------------------------------------------------ public

    def write(self, pcm: np.ndarray) -> None:
        """Continue the timeline with int16 16 kHz mono samples. Never waits for ASR."""
        ready: list[OpenConversation] = []
        with self._lock:
            if self.anchor is None:
                self.anchor = datetime.now(UTC) - timedelta(seconds=len(pcm) / SAMPLE_RATE)
            if self._resumable is not None:
                self._resume(self._resumable, ready)
            data = np.concatenate([self._rest, np.asarray(pcm, dtype=np.int16).reshape(-1)])
            # Whole batches only: the audio waits ≤ 128 ms for the VAD (vad.BATCH_FRAMES).
            n = len(data) // self._batch * self._batch
            if n:
                self._frames(data[:n], ready)
            self._rest = data[n:].copy()
            if self._utt is not None:
                self._utt.writer.keep_tail(self._rest)
        self._handoff.deliver(ready)

    def _frames(self, data: np.ndarray, ready: list[OpenConversation]) -> None:
        frames = data.reshape(-1, FRAME_SAMPLES)
        if self.disk.paused is not None and not self.disk.back(self.samples):
            self.samples += len(frames) * FRAME_SAMPLES  # the timeline goes on; nothing is spooled
            return
        for i, (frame, prob) in enumerate(zip(frames, self._vad.probs(frames), strict=True)):
            try:
                self._frame(frame, float(prob), ready)
            except OSError as exc:
                self._spool_failed(exc)
                self.samples += (len(frames) - i - 1) * FRAME_SAMPLES
                return

    def _spool_failed(self, exc: OSError) -> None:
        """Disk full or gone: pause capture for this device (the link stays up, the timeline goes
        on) rather than write torn files; what the utterance in progress has on disk is kept as
        an utterance. Capture resumes by itself once space is back (``DiskGuard.back``)."""
        if self._utt is not None:
            open_utt, self._utt = self._utt, None
            samples = open_utt.writer.abandon()
            conv, utt = open_utt.conv, open_utt.utt
            if samples >= self._min_speech:
                utt.samples = samples
                conv.utterances[utt.key] = utt
                conv.last_end = utt.offset + utt.samples
                self._last_speech_end = open_utt.start + samples
                with contextlib.suppress(OSError):  # else recover() reads the length from disk
                    conv.save_utterance(utt, complete=True)
                if self._window and self._window_conv is not conv:
                    self._flush_window()
                self._window.append(utt)
                self._window_conv = conv
                self._flush_window()
            else:
                with contextlib.suppress(OSError):
                    conv.drop_utterance_files(utt.key)
        self._ep = Endpointer(self.config.vad)  # speech resumes from silence after the pause
        self.disk.pause(exc, self.samples)

    def close(self) -> None:
        """The stream ends: finish the utterance and the conversation in progress. Their
        transcription completes on the worker (or, if it is stopped first, on ``recover``)."""
        ready: list[OpenConversation] = []
        with self._lock:
            if self._resumable is not None:
                self._close_resumable(self._resumable, ready)
            if len(self._rest):
                pad = -len(self._rest) % FRAME_SAMPLES
                self._frames(np.concatenate([self._rest, np.zeros(pad, np.int16)]), ready)
                self._rest = np.zeros(0, dtype=np.int16)
            for ev in self._ep.flush(self.samples):
                if ev.kind == "end":
                    self._end_utterance(ev.sample, ev.speech_samples)
            if self._conv is not None:
                self._close_conversation(self._conv, ready)
        self._handoff.deliver(ready)

    def recover(self, *, resume: bool = False) -> int:
        """Finish conversations a previous run left on disk (crash, power cut, stopped worker):
        transcribe their spooled speech and hand each on once. Returns how many were found.
        ``resume``: keep the newest one open for this run's audio when its gap has not passed
        (see the module docstring); it closes by the usual gap rule, or by wall clock if no
        audio comes."""
        found = 0
        ready: list[OpenConversation] = []
        with self._lock:
            paths = sorted(p for p in self.dir.iterdir() if p.is_dir() and p not in self._convs)
            for path in paths:
                if path in self._convs:
                    continue
                conv = OpenConversation.load(path)
                if conv is None and not any(path.glob("*.pcm")):
                    # Killed between creating the folder and saving its first state: nothing
                    # was recorded in it yet.
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                if conv is None:
                    _LOGGER.warning("%s: unreadable conversation state in %s; left in place",
                                    self.label, path)
                    continue
                found += 1
                self._convs[path] = conv
                candidate = resume and not conv.closed and path == paths[-1]
                cut = conv.load_utterances(keep_cut=candidate)
                if candidate and self._keep_open(conv, cut):
                    continue
                conv.closed = True
                conv.save()
                _LOGGER.info("%s: recovering conversation %s (%.1f s of speech to transcribe)",
                             self.label, conv.client_session_id, conv.waiting_samples / SAMPLE_RATE)
                self._submit_packed(conv, conv.waiting)
                self._maybe_ready(conv, ready)
        self._handoff.deliver(ready)
        return found

    def backlog_seconds(self) -> float:
        """Seconds of this device's speech on disk and not yet transcribed."""
        with self._lock:
            return sum(c.waiting_samples for c in self._convs.values()) / SAMPLE_RATE

    @property
    def unqueued(self) -> int:
        """Finished conversations waiting for the outbox to take them (its disk was full)."""
        return self._handoff.waiting

    @property
    def settled(self) -> bool:
        """Every conversation it saw is in the outbox (``omi-bridge sync`` waits for this)."""
        with self._lock:
            return not self._convs and not self._handoff.waiting

    @property
    def in_conversation(self) -> bool:
        return self._conv is not None

    @property
    def conversation_started_at(self) -> datetime | None:
        """Wall-clock start of the open conversation (its first speech minus pre-pad), or None."""
        conv = self._conv
        return conv.started_at if conv is not None else None

    # ------------------------------------------------------------------ per frame

    def _frame(self, frame: np.ndarray, prob: float, ready: list[OpenConversation]) -> None:
        start = self.samples
        end = start + FRAME_SAMPLES
        self.samples = end
        self._ring.append((start, frame))
        if self._utt is not None:
            self._utt.writer.write(frame)
        for ev in self._ep.push(start, prob):
            if ev.kind == "end":
                self._end_utterance(ev.sample, ev.speech_samples)
            elif ev.kind == "start":
                self._start_utterance(ev.sample, ready)
            else:  # cut: the tail after the cut opens the next utterance
                assert self._utt is not None
                tail = spool.read_pcm(self._utt.writer.path)[ev.sample - self._utt.start:]
                self._end_utterance(ev.sample, ev.speech_samples)
                self._start_utterance(ev.sample, ready, audio=tail)
        if self._utt is None:
            if self._window and end - self._last_speech_end >= self._flush_pause:
                self._flush_paused_window()
            if self._conv is not None and end - self._last_speech_end >= self._gap:
                self._close_conversation(self._conv, ready)

    def _start_utterance(self, at: int, ready: list[OpenConversation],
                         audio: np.ndarray | None = None) -> None:
        conv = self._conv
        if conv is not None and conv.start_sample is not None and at - conv.start_sample >= self._max_conv:
            self._close_conversation(conv, ready)
            conv = None
        if conv is None:
            conv = self._open_conversation(at)
        utt = Utterance(conv.new_key(), at - (conv.start_sample or 0), 0)
        conv.save_utterance(utt, complete=False)
        self._utt = OpenUtterance(conv, utt, at)
        if audio is None:
            audio = np.concatenate([f for s, f in self._ring if s + FRAME_SAMPLES > at])
            first = next(s for s, _ in self._ring if s + FRAME_SAMPLES > at)
            audio = audio[at - first:]
        self._utt.writer.write(audio)

    def _end_utterance(self, at: int, speech_samples: int) -> None:
        open_utt = self._utt
        if open_utt is None:
            return
        self._utt = None
        conv, utt = open_utt.conv, open_utt.utt
        utt.samples = at - open_utt.start
        if speech_samples < self._min_speech or utt.samples <= 0:
            open_utt.writer.discard()
            conv.drop_utterance_files(utt.key)
            if not conv.utterances and conv is self._conv:
                # A lone click or cough does not open a conversation.
                self._conv = None
                self._convs.pop(conv.dir, None)
                conv.remove()
            return
        open_utt.writer.finish(utt.samples)
        conv.save_utterance(utt, complete=True)
        conv.utterances[utt.key] = utt
        self.speech_seconds += utt.samples / SAMPLE_RATE
        conv.last_end = utt.offset + utt.samples
        conv.save()
        self._last_speech_end = at
        if self._window and (self._window_conv is not conv or self._window_samples() + self._glue
                             + utt.samples > self._window_max):
            self._flush_window()
        self._window.append(utt)
        self._window_conv = conv

    def _flush_paused_window(self) -> None:
        """Speech paused: hand the window on, unless other windows already wait for the worker.
        Then it would reach Whisper no sooner, and speech arriving meanwhile rides in the same
        call (each call encodes 30 s whatever it holds); it goes once the queue drains."""
        if not self.worker.waiting:
            self._flush_window()
        elif not self._flush_requested:
            self._flush_requested = True
            self.worker.when_drained(self._on_worker_drained)

    def _on_worker_drained(self) -> None:
        with self._lock:
            self._flush_requested = False
            if (self._window and self._utt is None
                    and self.samples - self._last_speech_end >= self._flush_pause):
                self._flush_window()

    def _window_samples(self) -> int:
        return sum(u.samples for u in self._window) + self._glue * (len(self._window) - 1)

    def _flush_window(self) -> None:
        if self._window and self._window_conv is not None:
            self._submit(self._window_conv, self._window)
        self._window = []
        self._window_conv = None

    def _submit(self, conv: OpenConversation, utts: list[Utterance]) -> None:
        pieces = [Piece(u.key, conv.pcm_path(u.key), u.samples) for u in utts]
        self.worker.submit(Window(self.label, pieces, functools.partial(self._on_window, conv),
                                  on_give_up=functools.partial(self._on_give_up, conv)))

    def _submit_packed(self, conv: OpenConversation, utts: list[Utterance]) -> None:
        batch: list[Utterance] = []
        size = 0
        for u in sorted(utts, key=lambda u: u.offset):
            if batch and size + self._glue + u.samples > self._window_max:
                self._submit(conv, batch)
                batch, size = [], 0
            size += u.samples + (self._glue if batch else 0)
            batch.append(u)
        if batch:
            self._submit(conv, batch)

    def _open_conversation(self, at: int) -> OpenConversation:
        assert self.anchor is not None
        started = self.anchor + timedelta(seconds=at / SAMPLE_RATE)
        path = self.dir / f"c{round(started.timestamp() * 1000)}"
        path.mkdir(parents=True, exist_ok=True)
        lang = self.config.asr.language
        conv = OpenConversation(dir=path, client_session_id=self._session_id(started, at / SAMPLE_RATE),
                                source=self.source, device=self.label, started_at=started,
                                start_sample=at, default_language="en" if lang == "auto" else lang)
        conv.save()
        self._conv = conv
        self._convs[path] = conv
        _LOGGER.info("%s: conversation started at %s", self.label, started.isoformat())
        return conv

    def _close_conversation(self, conv: OpenConversation, ready: list[OpenConversation]) -> None:
        if self._window_conv is conv:
            self._flush_window()
        conv.closed = True
        try:
            conv.save()
        except OSError as exc:  # a full disk: recover() closes what it finds after a restart
            _LOGGER.warning("%s: cannot save conversation %s: %s", self.label,
                            conv.client_session_id, exc)
        if self._conv is conv:
            self._conv = None
        _LOGGER.info("%s: conversation %s closed (%.1f s)", self.label, conv.client_session_id,
                     conv.last_end / SAMPLE_RATE)
        self._maybe_ready(conv, ready)

    # ------------------------------------------------------------------ results (worker thread)

    def _on_window(self, conv: OpenConversation, window: Window, results: list[list[RawSegment]],
                   language: str | None) -> None:
        ready: list[OpenConversation] = []
        fresh: list[Segment] = []
        with self._lock:
            before = (len(conv.segments), set(conv.done), dict(conv.languages))
            for piece, segs in zip(window.pieces, results, strict=True):
                utt = conv.utterances.get(piece.key)
                if utt is None or piece.key in conv.done:
                    continue
                offset = utt.offset / SAMPLE_RATE
                new = [Segment(s.text, round(offset + s.start, 3), round(offset + s.end, 3)) for s in segs]
                conv.segments.extend(new)
                fresh.extend(new)
                conv.done.add(piece.key)
            if language:
                conv.languages[language] = conv.languages.get(language, 0.0) + round(window.seconds, 2)
            try:
                conv.save()  # segments are durable before the audio they came from is deleted
            except OSError:
                # Disk full: as if this window had not been transcribed; the worker retries it.
                del conv.segments[before[0]:]
                conv.done, conv.languages = before[1], before[2]
                raise
            for piece in window.pieces:
                conv.drop_utterance_files(piece.key)
            self._maybe_ready(conv, ready)
        if fresh and self.on_segments is not None:
            try:
                self.on_segments(conv.client_session_id, conv.started_at, fresh)
            except Exception:
                _LOGGER.exception("%s: segment callback failed", self.label)
        self._handoff.deliver(ready)

    def _on_give_up(self, conv: OpenConversation, window: Window, error: str) -> None:
        """An utterance failed ``[asr] max_attempts`` times: move its audio to the quarantine
        folder (with a note of why), and finish the conversation without it. Never deleted."""
        ready: list[OpenConversation] = []
        with self._lock:
            for piece in window.pieces:
                utt = conv.utterances.get(piece.key)
                if utt is None or piece.key in conv.done:
                    continue
                dest = set_aside(self.quarantine_dir, conv, utt, piece.attempts, error, self.label)
                conv.done.add(piece.key)
                conv.save()
                self.quarantined += 1
                _LOGGER.error("%s: an utterance of %.1f s in conversation %s failed to transcribe "
                              "%d times (%s); set aside in %s, the conversation goes on without it",
                              self.label, utt.samples / SAMPLE_RATE, conv.client_session_id,
                              piece.attempts, error, dest / f"{piece.key}.pcm")
            self._maybe_ready(conv, ready)
        self._handoff.deliver(ready)

    def _maybe_ready(self, conv: OpenConversation, ready: list[OpenConversation]) -> None:
        if conv.ready:
            conv.emitted = True
            self._convs.pop(conv.dir, None)
            ready.append(conv)
