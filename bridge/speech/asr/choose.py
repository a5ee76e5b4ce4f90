"""Which backend transcribes: ``[asr] backend`` and its ``fallback``, built for the worker.

Kept apart from ``backend.py`` (the contract every backend meets), so that module imports no
backend and each backend imports only the contract.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from bridge.config import AsrOptions
from bridge.speech.asr.backend import AsrBackend, AsrUnavailable, WindowResult
from bridge.speech.asr.local import LocalBackend
from bridge.speech.asr.wyoming import WyomingBackend

_LOGGER = logging.getLogger(__name__)


def make_backend(options: AsrOptions, model: Any = None) -> AsrBackend:
    """The backend ``[asr] backend`` names; ``model`` is an already loaded local model (tests)."""
    if options.backend == "wyoming":
        remote = WyomingBackend(options)
        if options.fallback == "local":
            return FallbackBackend(remote, options, model)
        return remote
    return LocalBackend(options, model)


class FallbackBackend:
    """A Wyoming server first; the local model (loaded on the first outage) while it is away."""

    def __init__(self, primary: AsrBackend, options: AsrOptions, model: Any = None) -> None:
        self.primary = primary
        self.options = options
        self._model = model
        self._local: AsrBackend | None = None
        self.max_in_flight = primary.max_in_flight
        self.merges = False  # the primary answers without times
        self.fallback_windows = 0

    def _fallback(self) -> AsrBackend:
        if self._local is None:
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
