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

from bridge.config import AsrOptions
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


def make_backend(options: AsrOptions, model: Any = None) -> AsrBackend:
    """The backend ``[asr] backend`` names; ``model`` is an already loaded local model (tests)."""
    if options.backend == "wyoming":
        from bridge.speech.asr.wyoming import WyomingBackend

        remote = WyomingBackend(options)
        if options.fallback == "local":
            return FallbackBackend(remote, options, model)
        return remote
    from bridge.speech.asr.local import LocalBackend

    return LocalBackend(options, model)


class FallbackBackend:
    """A Wyoming server first; the local model (loaded on the first outage) while it is away."""

    def __init__(self, primary: AsrBackend, options: AsrOptions, model: Any = None) -> None:
        self.primary = primary
        self.options = options
        self._model = model
        self._local: AsrBackend | None = None
        self.max_in_flight = primary.max_in_flight
        self.fallback_windows = 0

    def _fallback(self) -> AsrBackend:
        if self._local is None:
            from bridge.speech.asr.local import LocalBackend

            local = LocalBackend(self.options, self._model)
            local.start()
            _LOGGER.warning("transcription falls back to %s while the server is away", local.describe())
            self._local = local
        return self._local

    def start(self) -> None:
        self.primary.start()

    def probe(self) -> None:
        try:
            self.primary.probe()
        except AsrUnavailable:
            self._fallback().probe()

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        try:
            return self.primary.transcribe(audios)
        except AsrUnavailable as exc:
            _LOGGER.warning("%s; this window is transcribed locally", exc.message)
            result = self._fallback().transcribe(audios)
            self.fallback_windows += 1
            return result

    def describe(self) -> str:
        return f"{self.primary.describe()}, local model while it is away"

    def status(self) -> dict[str, Any]:
        return {**self.primary.status(), "fallback": "local", "fallback_windows": self.fallback_windows}

    def close(self) -> None:
        self.primary.close()
        if self._local is not None:
            self._local.close()
