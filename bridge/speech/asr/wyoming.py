"""The Wyoming backend: windows go to a Wyoming ASR server (``[asr] backend = "wyoming"``).

Wyoming is the Home Assistant voice protocol; its ASR servers (wyoming-faster-whisper,
wyoming-whisper-cpp, ...) run on any box with a CPU or GPU, so one server can transcribe for
several bridges (docs/reference/wyoming.md). Each window is one connection:

    → describe?   transcribe(language)  audio-start  audio-chunk × n  audio-stop
    ← transcript(text)

The window is sent exactly as the local backend sees it: the utterances glued with
``GAP_SECONDS`` of silence, 16 kHz mono 16-bit PCM. A Wyoming transcript is text only, without
segment times, so the text is laid onto the window's utterances by the same word split the local
backend uses for a segment spanning several of them: one segment per utterance, from its start
to its end. Times are thus as exact as the bridge's own VAD, not finer.

Everything the server does wrong ends in ``AsrUnavailable`` (no connection, no answer within
``[asr] timeout_seconds``, connection closed before the transcript, something that is not a
Wyoming event) or ``AsrError`` (the server said ``error``); the worker keeps the window on disk
and tries again. Nothing here imports faster-whisper.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np

from bridge.config import AsrOptions
from bridge.core.errors import BridgeError
from bridge.core.pcm import SAMPLE_RATE
from bridge.speech.asr.backend import AsrError, AsrUnavailable, RawSegment, WindowResult
from bridge.speech.asr.segments import glue, map_to_pieces, runaway

_LOGGER = logging.getLogger(__name__)

SAMPLE_WIDTH = 2
"""Bytes per sample of the audio we send: 16-bit PCM (wyoming.md §3, audio-start)."""
CHANNELS = 1
CHUNK_SAMPLES = SAMPLE_RATE
"""Audio per audio-chunk event: one second (the protocol leaves the size to the client)."""
MAX_EVENTS = 10_000
"""Events read while waiting for the transcript before the answer counts as garbage (a streaming
server sends transcript-chunk events first; none sends this many for ≤ 29 s of audio)."""
TEXT_SNAP_WORDS = 8
"""How far the split of a window's text between its utterances may move to land after a
sentence end: a whole window's text has no times, so a proportional cut is only a first guess
(speaking rates differ by utterance), and a server's punctuation marks the pauses."""
HINT = ("check that the Wyoming server at [asr] uri is running and reachable; the audio waits on "
        "disk and is retried (or set [asr] fallback = \"local\")")


def parse_uri(uri: str) -> tuple[str, str, int] | None:
    """``tcp://host:port`` → ("tcp", host, port), ``unix:///path`` → ("unix", path, 0); None if
    it is neither."""
    try:
        parsed = urlparse(uri)
        port = parsed.port
    except ValueError:
        return None
    if parsed.scheme == "tcp" and parsed.hostname and port:
        return "tcp", parsed.hostname, port
    if parsed.scheme == "unix" and parsed.path:
        return "unix", parsed.path, 0
    return None


class WyomingBackend:
    """A Wyoming ASR client; thread-safe, one connection per window."""

    def __init__(self, options: AsrOptions) -> None:
        self.options = options
        self.uri = options.uri
        self.max_in_flight = options.max_in_flight
        self.merges = False
        self._lock = threading.Lock()
        self.program: str | None = None
        self.model: str | None = None
        self.languages: list[str] = []
        self.rtt_seconds: float | None = None
        """Round trip of the last window (connect → transcript); before one, of ``describe``."""
        self.windows = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reachable: bool | None = None
        """Whether the last exchange reached the server (None before the first)."""

    # ------------------------------------------------------------------ the AsrBackend protocol

    def start(self) -> None:
        if parse_uri(self.uri) is None:
            raise BridgeError(f"[asr] uri {self.uri!r} is not a Wyoming address",
                              "write it as uri = \"tcp://host:10300\"")
        try:
            self.probe()
        except AsrError as exc:
            _LOGGER.error("%s; speech waits on disk until it answers", exc.message)

    def probe(self) -> None:
        t0 = time.monotonic()
        info = self._run(self._describe())
        rtt = time.monotonic() - t0
        asr = info.asr[0] if info.asr else None
        if asr is None:
            raise self._failed(AsrError(f"the Wyoming server at {self.uri} offers no speech-to-text",
                                        "point [asr] uri at a Wyoming ASR server"))
        models = [m for m in asr.models if m.installed] or list(asr.models)
        with self._lock:
            self.program = asr.name
            self.model = models[0].name if models else None
            self.languages = list(models[0].languages) if models else []
            if self.rtt_seconds is None:
                self.rtt_seconds = rtt
        _LOGGER.info("transcription: %s", self.describe())

    def transcribe(self, audios: Sequence[np.ndarray]) -> WindowResult:
        audio, bounds = glue(audios)
        out: list[list[RawSegment]] = [[] for _ in audios]
        if not len(audio):
            return out, None
        pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()
        language = None if self.options.language == "auto" else self.options.language
        t0 = time.monotonic()
        text, detected = self._run(self._transcribe(pcm, language))
        with self._lock:
            self.rtt_seconds = time.monotonic() - t0
            self.windows += 1
        text = " ".join(text.split())
        if text:
            for idx, piece_text, _start, _end in map_to_pieces(text, 0.0, bounds[-1][1], bounds,
                                                               snap=TEXT_SNAP_WORDS):
                if runaway(piece_text):
                    _LOGGER.debug("dropped (repetition): %r", piece_text)
                    continue
                length = bounds[idx][1] - bounds[idx][0]
                out[idx].append(RawSegment(piece_text, 0.0, round(length, 3)))
        return out, detected or language

    def describe(self) -> str:
        with self._lock:
            if self.program is None:
                return f"Wyoming server {self.uri} (not reached yet)"
            langs = ", ".join(self.languages[:5]) + (" ..." if len(self.languages) > 5 else "")
            return (f"Wyoming server {self.uri}: {self.program}, model {self.model or '?'}"
                    f" ({len(self.languages)} languages: {langs})")

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": "wyoming", "server": self.uri, "program": self.program,
                    "model": self.model, "languages": len(self.languages),
                    "reachable": self.reachable,
                    "rtt_seconds": None if self.rtt_seconds is None else round(self.rtt_seconds, 3),
                    "windows": self.windows, "errors": self.errors, "last_error": self.last_error}

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ the exchange

    def _run(self, coro: Any) -> Any:
        """Run one exchange on a private event loop (the worker thread has none), bounded by
        ``[asr] timeout_seconds``; every failure becomes an ``AsrError`` and is counted."""
        try:
            result = asyncio.run(asyncio.wait_for(coro, self.options.timeout_seconds))
        except AsrError as exc:
            raise self._failed(exc) from None
        except TimeoutError:
            raise self._failed(AsrUnavailable(
                f"the Wyoming server at {self.uri} did not answer within "
                f"{self.options.timeout_seconds:g} s", HINT)) from None
        except OSError as exc:
            raise self._failed(AsrUnavailable(
                f"cannot reach the Wyoming server at {self.uri}: {exc.strerror or exc}", HINT)) from None
        with self._lock:
            self.reachable = True
        return result

    def _failed(self, exc: AsrError) -> AsrError:
        with self._lock:
            self.errors += 1
            self.last_error = exc.message
            self.last_error_at = time.time()
            self.reachable = not isinstance(exc, AsrUnavailable)
        return exc

    def _client(self) -> Any:
        from wyoming.client import AsyncClient

        return AsyncClient.from_uri(self.uri)

    async def _describe(self) -> Any:
        from wyoming.info import Describe, Info

        async with self._client() as client:
            await client.write_event(Describe().event())
            event = await self._answer(client, Info.is_type)
            try:
                return Info.from_event(event)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise self._garbage(f"an info event it could not be read as ({exc})") from None

    async def _transcribe(self, pcm: bytes, language: str | None) -> tuple[str, str | None]:
        from wyoming.asr import Transcribe, Transcript
        from wyoming.audio import AudioChunk, AudioStart, AudioStop

        step = CHUNK_SAMPLES * SAMPLE_WIDTH
        async with self._client() as client:
            await client.write_event(Transcribe(language=language).event())
            await client.write_event(AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH,
                                                channels=CHANNELS).event())
            for i in range(0, len(pcm), step):
                await client.write_event(AudioChunk(rate=SAMPLE_RATE, width=SAMPLE_WIDTH,
                                                    channels=CHANNELS, audio=pcm[i:i + step]).event())
            await client.write_event(AudioStop().event())
            event = await self._answer(client, Transcript.is_type)
            try:
                transcript = Transcript.from_event(event)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise self._garbage(f"a transcript without text ({exc})") from None
            if not isinstance(transcript.text, str):
                raise self._garbage(f"a transcript whose text is {transcript.text!r}")
            lang = transcript.language if isinstance(transcript.language, str) else None
            return transcript.text, lang

    async def _answer(self, client: Any, wanted: Any) -> Any:
        """Read events until one of the ``wanted`` type; an ``error`` event or anything that is
        not Wyoming is an ``AsrError``."""
        from wyoming.error import Error

        for _ in range(MAX_EVENTS):
            try:
                event = await client.read_event()
            except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
                raise self._garbage(f"something that is not a Wyoming event ({exc!r})") from None
            except asyncio.IncompleteReadError:
                event = None
            if event is None:
                # wyoming's reader also ends here on a line that is not JSON.
                raise AsrUnavailable(f"the Wyoming server at {self.uri} closed the connection "
                                     "before answering (or answered something that is not Wyoming)",
                                     HINT)
            if wanted(event.type):
                return event
            if Error.is_type(event.type):
                text = event.data.get("text") if isinstance(event.data, dict) else None
                raise AsrError(f"the Wyoming server at {self.uri} answered: error {text!r}", HINT)
        raise self._garbage(f"{MAX_EVENTS} events without the answer")

    def _garbage(self, what: str) -> AsrError:
        return AsrError(f"the Wyoming server at {self.uri} answered {what}", HINT)
