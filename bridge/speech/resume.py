"""A restart continues the conversation it interrupted (docs/architecture.md, "kill -9").

On start, ``SpeechPipeline.recover(resume=True)`` keeps the newest open conversation open when
its last speech ended less than ``gap_seconds`` ago: this run's first audio joins it (same
``client_session_id``), and the utterance the crash cut is continued in the same file, end to end
with this run's first audio so Whisper hears the sentence whole; the time the daemon was down is a
gap before that utterance, so the words after the restart keep their times. No audio before the
gap passes closes it by wall clock. ``CrashResume`` is that part of ``SpeechPipeline``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bridge.config import Config
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool
from bridge.speech.conversations import OpenConversation, Utterance
from bridge.speech.handoff import HandOff
from bridge.speech.vad import Endpointer

_LOGGER = logging.getLogger(__name__)

JOIN_MAX_SECONDS = 30.0
"""The longest recording gap across which an utterance cut by a crash is continued: a restart
(process start, model load, BLE reconnect) takes seconds; a longer gap is a pause in speech, and the
first half is transcribed on its own."""


class OpenUtterance:
    """The utterance being spooled: its conversation, its place and its file."""

    def __init__(self, conv: OpenConversation, utt: Utterance, start: int,
                 writer: spool.PcmWriter | None = None) -> None:
        self.conv = conv
        self.utt = utt
        self.start = start  # on the stream timeline
        self.writer = writer or spool.PcmWriter(conv.pcm_path(utt.key))


@dataclass
class Resumable:
    """An interrupted conversation waiting for this run's first audio to continue it."""

    conv: OpenConversation
    cut: Utterance | None
    """The utterance the crash interrupted (its audio on disk, its end unknown), if any."""
    last_speech: datetime
    """Wall-clock end of the last speech on disk."""
    timer: threading.Timer | None = None


class CrashResume:
    """The resuming half of ``SpeechPipeline`` (which owns every attribute named here)."""

    config: Config
    label: str
    anchor: datetime | None
    _lock: threading.RLock
    _resumable: Resumable | None
    _conv: OpenConversation | None
    _utt: OpenUtterance | None
    _ep: Endpointer
    _last_speech_end: int
    _handoff: HandOff

    def _submit_packed(self, conv: OpenConversation, utts: list[Utterance]) -> None:
        raise NotImplementedError

    def _maybe_ready(self, conv: OpenConversation, ready: list[OpenConversation]) -> None:
        raise NotImplementedError


    def _keep_open(self, conv: OpenConversation, cut: Utterance | None) -> bool:
        """Hold ``conv`` open for this run's first audio if its gap has not passed yet."""
        end = max(conv.last_end, cut.offset + cut.samples if cut else 0)
        last_speech = conv.started_at + timedelta(seconds=end / SAMPLE_RATE)
        left = self.config.conversation.gap_seconds - (datetime.now(UTC) - last_speech).total_seconds()
        if left <= 0:
            if cut is not None:
                self._accept_cut(conv, cut)
            return False
        # The saved next_index may predate the utterance in progress at the crash: new keys
        # must never reuse the name of audio still on disk.
        used = [int(p.stem[1:]) for p in conv.dir.glob("u*.json") if p.stem[1:].isdigit()]
        conv.next_index = max([conv.next_index, *(i + 1 for i in used)])
        r = Resumable(conv, cut, last_speech)
        # No audio at all (the device stays away): the gap rule then runs on the wall clock.
        r.timer = threading.Timer(left, self._resume_expired, args=(r,))
        r.timer.daemon = True
        r.timer.start()
        self._resumable = r
        _LOGGER.info("%s: continuing interrupted conversation %s (last speech %.0f s ago)",
                     self.label, conv.client_session_id, self.config.conversation.gap_seconds - left)
        self._submit_packed(conv, conv.waiting)
        return True

    def _accept_cut(self, conv: OpenConversation, cut: Utterance) -> None:
        """Take the cut utterance as it is on disk: it is transcribed on its own."""
        conv.save_utterance(cut, complete=True)
        conv.utterances[cut.key] = cut
        conv.last_end = max(conv.last_end, cut.offset + cut.samples)
        conv.save()

    def _resume(self, r: Resumable, ready: list[OpenConversation]) -> None:
        """This run's first audio: continue the interrupted conversation, or close it if its gap
        passed while the daemon was down. Sample 0 of this stream is ``self.anchor``."""
        assert self.anchor is not None
        self._resumable = None
        if r.timer is not None:
            r.timer.cancel()
        down = (self.anchor - r.last_speech).total_seconds()
        if down >= self.config.conversation.gap_seconds:
            self._close_resumable(r, ready)
            return
        conv = r.conv
        # Where the conversation started on this stream's timeline: before sample 0.
        conv.start_sample = round((conv.started_at - self.anchor).total_seconds() * SAMPLE_RATE)
        self._conv = conv
        self._last_speech_end = conv.start_sample + conv.last_end
        cut = r.cut
        if cut is None:
            return
        if down > JOIN_MAX_SECONDS:
            self._accept_cut(conv, cut)
            self._submit_packed(conv, [cut])
            return
        # The pendant sends nothing while no one is subscribed (it throws frames away while
        # connected, stores them while not: omi-device.md §5.2), so this run's first audio is the
        # next thing it sent and the halves of the cut word are joined end to end: Whisper hears
        # the sentence whole, not a word split by seconds of silence. The time the daemon was
        # down becomes a gap before the utterance (its start moves later); what follows keeps
        # its true time.
        start = conv.start_sample + cut.offset
        writer = spool.PcmWriter(conv.pcm_path(cut.key), append=True)
        down_samples = max(0, -(start + writer.samples))
        if down_samples:
            cut.offset += down_samples
            start += down_samples
            conv.save_utterance(cut, complete=False)
        self._utt = OpenUtterance(conv, cut, start, writer)
        self._ep.resume(start)
        _LOGGER.info("%s: continuing the utterance cut by the restart (down %.1f s)", self.label,
                     down_samples / SAMPLE_RATE)

    def _close_resumable(self, r: Resumable, ready: list[OpenConversation]) -> None:
        self._resumable = None
        if r.timer is not None:
            r.timer.cancel()
        if r.cut is not None:
            self._accept_cut(r.conv, r.cut)
            self._submit_packed(r.conv, [r.cut])
        r.conv.closed = True
        r.conv.save()
        _LOGGER.info("%s: interrupted conversation %s closed", self.label, r.conv.client_session_id)
        self._maybe_ready(r.conv, ready)

    def _resume_expired(self, r: Resumable) -> None:
        ready: list[OpenConversation] = []
        with self._lock:
            if self._resumable is r:
                self._close_resumable(r, ready)
        self._handoff.deliver(ready)
