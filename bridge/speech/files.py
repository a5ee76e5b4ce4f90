"""Audio files through the same VAD → conversation → Whisper path.

A file is fed to a ``SpeechPipeline`` as fast as the machine allows (the pipeline works on the
sample timeline, never on the clock), so a file yields exactly the conversations a device would
have produced from the same audio. Its spool lives in a temporary directory: a file can always
be transcribed again.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import numpy as np

from bridge.audio.files import decode_file
from bridge.config import Config
from bridge.core.errors import BridgeError
from bridge.core.pcm import SAMPLE_RATE
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.conversations import MAX_SESSION_ID
from bridge.speech.pipeline import SpeechPipeline

FEED_SAMPLES = SAMPLE_RATE * 10
"""Chunk handed to the pipeline per write (10 s): progress granularity, no other meaning."""
DRAIN_TIMEOUT_SECONDS = 3600.0
"""Upper bound on waiting for the worker after the last file (hours of speech on a slow Pi)."""
PROGRESS_WIDTH = 30


def file_session_id(digest: str, offset_seconds: float) -> str:
    """Importing the same file twice yields the same ids, so the outbox never posts it twice."""
    return f"omi-bridge:file:{digest}:{round(offset_seconds * 1000)}"[:MAX_SESSION_ID]


def transcribe_pcm(pcm: np.ndarray, config: Config, worker: AsrWorker, *, started_at: datetime,
                   digest: str, source: str = "external_integration", label: str = "",
                   progress: Callable[[int], None] | None = None) -> list[Conversation]:
    """One recording → its conversations (sorted by start). ``worker`` must be started."""
    found: list[Conversation] = []
    with tempfile.TemporaryDirectory(prefix="omi-bridge-transcribe-") as tmp:
        pipeline = SpeechPipeline(
            f"file-{digest[:16]}", config, worker, found.append, source=source,
            label=label or f"file {digest[:8]}", anchor=started_at,
            session_id=lambda _started, offset: file_session_id(digest, offset), storage=Path(tmp))
        for i in range(0, len(pcm), FEED_SAMPLES):
            pipeline.write(pcm[i:i + FEED_SAMPLES])
            if progress:
                progress(min(len(pcm), i + FEED_SAMPLES))
        pipeline.close()
        if not worker.wait_idle(DRAIN_TIMEOUT_SECONDS):
            raise BridgeError("transcription did not finish", "try a smaller [asr] model")
    return sorted(found, key=lambda c: c.started_at)


def _progress_bar(name: str, total: int, stream: TextIO) -> Callable[[int], None]:
    def show(done: int) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * PROGRESS_WIDTH)
        stream.write(f"\r{name[:40]} [{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] "
                     f"{frac * 100:3.0f}% of {total / SAMPLE_RATE:.0f} s")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show


def transcribe_files(paths: Sequence[str], config: Config, worker: AsrWorker, *,
                     started_at: datetime | None = None, source: str = "external_integration",
                     progress_stream: TextIO | None = None) -> list[Conversation]:
    """Each file in turn; ``started_at`` is the first file's start (later files follow it),
    otherwise each starts at its mtime minus its duration."""
    out: list[Conversation] = []
    next_start = started_at
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise BridgeError(f"{path} is not a file", "pass audio files to transcribe")
        pcm = decode_file(p)
        seconds = len(pcm) / SAMPLE_RATE
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:32]
        if next_start is None:
            start = datetime.fromtimestamp(p.stat().st_mtime, UTC) - timedelta(seconds=seconds)
        else:
            start = next_start
            next_start = start + timedelta(seconds=seconds)
        progress = _progress_bar(p.name, len(pcm), progress_stream) if progress_stream else None
        out += transcribe_pcm(pcm, config, worker, started_at=start, digest=digest, source=source,
                              label=p.name, progress=progress)
    return out
