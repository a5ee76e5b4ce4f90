"""Where a window of speech is transcribed: the seam between the worker and an ASR engine.

The worker hands a backend the utterances of one window as 16 kHz mono int16 arrays and gets
segments per utterance back (times from each utterance's start) and the language. Two backends:

- ``local`` (``bridge.speech.asr.local``): faster-whisper in this process, the default.
- ``wyoming`` (``bridge.speech.asr.wyoming``): a Wyoming ASR server elsewhere on the network;
  faster-whisper is then never imported and no model is loaded here.

A backend raises ``AsrError`` when a window could not be transcribed (the worker keeps its audio
on disk and tries again); ``AsrUnavailable`` when the engine itself is away (server down, timed
out, connection cut), which says nothing about the audio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bridge.core.errors import BridgeError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSegment:
    """Text with times in seconds from the start of its utterance."""

    text: str
    start: float
    end: float


WindowResult = tuple[list[list[RawSegment]], str | None]
"""Segments per utterance of the window, and the language (None when not known)."""


class AsrError(BridgeError):
    """A window could not be transcribed; its audio stays on disk and it is tried again."""


class AsrUnavailable(AsrError):
    """The transcription engine cannot be reached or did not answer in time (not the audio's fault)."""


class AsrBackend(Protocol):
    """What the worker needs from a transcription engine."""

    max_in_flight: int
    """Windows this backend may transcribe at once (the local model: 1)."""
    merges: bool
    """Queued windows of different devices may share one call: the backend places text on each
    utterance by its own times (the local model's segment times). A Wyoming answer has no times,
    so its text would be shared out across devices by length: it does not merge."""

    def start(self) -> None:
        """Get ready: load the model, or ask the server what it runs. Raises ``BridgeError`` only
        for what no retry can mend (a model that does not load); an unreachable server is logged
        and shown in ``status()``, and windows wait for it."""

    def probe(self) -> None:
        """Check now that a window could be transcribed; raise ``AsrUnavailable`` if not."""

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        """One window: consecutive utterances (16 kHz mono int16) → segments per utterance."""

    def describe(self) -> str:
        """One line for the journal: what transcribes (engine, model, where)."""

    def status(self) -> dict[str, Any]:
        """For ``status`` / state.json: backend, server, model, round-trip time, errors."""

    def close(self) -> None:
        """Release what ``start`` took."""
