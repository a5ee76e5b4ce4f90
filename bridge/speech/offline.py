"""Stored (offline) audio through the same speech path as live audio, at the times it was spoken.

``OfflineFeeder`` is the ``StoredAudioSink`` of one pendant (``bridge.core.stored``). Each *run*
of stored audio (a stretch of recording without a gap longer than ``gap_seconds``) gets a fresh
``SpeechPipeline`` anchored at the run's first stored UTC time: the same VAD, endpointer,
conversation splitting by real silences, ASR windows and recovery as live audio. Short pauses in
recording inside a run (2 s < pause ≤ gap) are written as silence of their wall-clock length, so
later speech keeps its true time and a pause still closes a conversation the way a live silence
would. Conversations are posted with source ``omi``.

**Ids.** A conversation's ``client_session_id`` is derived from the pendant and the stored
position of its first audio (record name + sample offset into it), never from the clock: a
re-sync, a re-read after a crash or a retry gives the same id, and the outbox and the server
drop the duplicate.

**Crash safety.** The feeder persists which run is open (its first cursor) before feeding it.
After a restart an unfinished run's speech folder is removed and the run is read again from its
first record (the download spool keeps it until the run is finished); finished runs' folders are
recovered like live ones (interrupted transcription finishes, each conversation handed on once).
"""

from __future__ import annotations

import bisect
import logging
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bridge.config import Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.core.stored import StoredBlock
from bridge.speech import spool
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.conversations import MAX_SESSION_ID
from bridge.speech.pipeline import SpeechPipeline

_LOGGER = logging.getLogger(__name__)

STATE_FILE = "feed.json"
RUN_PREFIX = "run"
CONTINUITY_SAMPLES = int(2.0 * SAMPLE_RATE)
"""Blocks starting within 2 s of where the previous one ended simply follow it (the device side
already aligned them, docs/reference/omi-storage.md §6.3); later ones get silence in between."""


def stored_session_id(address: str, position: str, sample: int) -> str:
    """The id of an offline conversation starting ``sample`` samples into stored record ``position``."""
    return f"omi-bridge:{address}:stored:{position}+{sample}"[:MAX_SESSION_ID]


class _Run:
    def __init__(self, cursor: int, pipeline: SpeechPipeline, started_at: float, estimated: bool) -> None:
        self.cursor = cursor
        self.pipeline = pipeline
        self.started_at = started_at
        self.estimated = estimated
        self.offsets: list[int] = []
        """Stream sample where each block starts (sorted), with its position in ``positions``."""
        self.positions: list[str] = []
        self.samples = 0
        """Samples written to the pipeline."""


class OfflineFeeder:
    """One pendant's stored audio → conversations (see the module docstring)."""

    def __init__(self, address: str, config: Config, worker: AsrWorker,
                 on_conversation: Callable[[Conversation], None], *, label: str = "",
                 root: Path, source: str = "omi") -> None:
        """``root``: the pendant's offline folder (``<storage>/offline/<pendant>``)."""
        self.address = address
        self.label = label or address
        self.config = config
        self.worker = worker
        self.on_conversation = on_conversation
        self.source = source
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = root / STATE_FILE
        state = spool.read_json(self.state_path) or {}
        self._open_cursor: int | None = state.get("run")
        self._next = int(state.get("next", 0))
        self._run: _Run | None = None
        self._closing: list[SpeechPipeline] = []
        self._lock = threading.RLock()
        self.conversations = 0
        """Offline conversations handed on since start."""
        self.estimated_conversations = 0

    # ------------------------------------------------------------------ start-up

    def recover(self) -> int:
        """After a restart: drop the unfinished run's speech (it is read again), finish the
        finished runs' conversations. Returns how many conversations were recovered."""
        found = 0
        base = self.root / spool.SPOOL_DIR
        if not base.is_dir():
            return 0
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            if self._open_cursor is not None and folder.name == self._run_key(self._open_cursor):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            pipeline = self._pipeline(folder.name, None, lambda _s, _o: "")
            n = pipeline.recover()
            found += n
            if n:
                self._closing.append(pipeline)
            elif not any(folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
        return found

    # ------------------------------------------------------------------ StoredAudioSink

    def resume_cursor(self) -> int:
        with self._lock:
            return self._open_cursor if self._open_cursor is not None else self._next

    def stored_audio(self, block: StoredBlock) -> None:
        with self._lock:
            run = self._run
            if run is None or block.new_run:
                if run is not None:
                    self._close_run()
                run = self._open_run(block)
            else:
                expected = run.started_at + run.samples / SAMPLE_RATE
                gap = round((block.started_at - expected) * SAMPLE_RATE)
                if gap > CONTINUITY_SAMPLES:
                    run.pipeline.write(np.zeros(gap, dtype=np.int16))
                    run.samples += gap
            run.offsets.append(run.samples)
            run.positions.append(block.position)
            pipeline = run.pipeline
            run.samples += len(block.pcm)
            self._next = block.cursor + 1
        pipeline.write(block.pcm)

    def stored_end(self) -> None:
        with self._lock:
            if self._run is not None:
                self._close_run()

    # ------------------------------------------------------------------ runs

    def _run_key(self, cursor: int) -> str:
        return f"{RUN_PREFIX}{cursor:012d}"

    def _pipeline(self, key: str, anchor: datetime | None,
                  session_id: Callable[[datetime, float], str], estimated: bool = False) -> SpeechPipeline:
        def hand_on(conv: Conversation) -> None:
            self.on_conversation(conv)
            self.conversations += 1
            if estimated:
                self.estimated_conversations += 1
                _LOGGER.warning("%s: offline conversation %s has ESTIMATED times (%s – %s): the "
                                "pendant's clock was not set when it was recorded", self.label,
                                conv.client_session_id, conv.started_at.isoformat(timespec="seconds"),
                                conv.finished_at.isoformat(timespec="seconds"))
            else:
                _LOGGER.info("%s: offline conversation %s from %s to %s (pendant clock)", self.label,
                             conv.client_session_id, conv.started_at.isoformat(timespec="seconds"),
                             conv.finished_at.isoformat(timespec="seconds"))

        return SpeechPipeline(key, self.config, self.worker, hand_on, source=self.source,
                              label=self.label, anchor=anchor, session_id=session_id,
                              storage=self.root)

    def _open_run(self, block: StoredBlock) -> _Run:
        self._open_cursor = block.cursor
        self._save()
        anchor = datetime.fromtimestamp(block.started_at, UTC)
        holder: list[_Run] = []

        def session_id(_started: datetime, offset: float) -> str:
            run = holder[0]
            sample = round(offset * SAMPLE_RATE)
            i = max(0, bisect.bisect_right(run.offsets, sample) - 1)
            if not run.positions:
                return stored_session_id(self.address, f"c{run.cursor}", sample)
            return stored_session_id(self.address, run.positions[i], sample - run.offsets[i])

        pipeline = self._pipeline(self._run_key(block.cursor), anchor, session_id, block.estimated)
        run = _Run(block.cursor, pipeline, block.started_at, block.estimated)
        holder.append(run)
        self._run = run
        _LOGGER.info("%s: stored recording from %s%s", self.label, anchor.isoformat(timespec="seconds"),
                     " (ESTIMATED time: the pendant's clock was not set)" if block.estimated else "")
        return run

    def _close_run(self) -> None:
        run = self._run
        assert run is not None
        self._run = None
        run.pipeline.close()  # conversations closed and on disk: recover() finishes them
        self._closing = [p for p in self._closing if p.backlog_seconds() > 0]
        self._closing.append(run.pipeline)
        self._open_cursor = None
        self._save()
        _LOGGER.info("%s: stored recording from %s ends (%.0f s)", self.label,
                     datetime.fromtimestamp(run.started_at, UTC).isoformat(timespec="seconds"),
                     run.samples / SAMPLE_RATE)

    def _save(self) -> None:
        spool.write_json(self.state_path, {"run": self._open_cursor, "next": self._next})

    # ------------------------------------------------------------------ status

    @property
    def in_run(self) -> bool:
        return self._run is not None

    def settled(self) -> bool:
        """No run open and every offline conversation so far is in the outbox."""
        with self._lock:
            if self._run is not None:
                return False
            pipes = list(self._closing)
        return all(p.settled for p in pipes)

    def backlog_seconds(self) -> float:
        with self._lock:
            pipes = list(self._closing) + ([self._run.pipeline] if self._run else [])
        return sum(p.backlog_seconds() for p in pipes)
