"""``omi-bridge transcribe``: audio files through the same VAD → conversation → Whisper path.

A file is fed to a ``SpeechPipeline`` as fast as the machine allows (the pipeline works on the
sample timeline, never on the clock), so a file yields exactly the conversations a device would
have produced from the same audio. Its spool lives in a temporary directory: a file can always
be transcribed again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import numpy as np

from bridge.audio.files import decode_file
from bridge.config import Config, load_config
from bridge.conversation import Conversation
from bridge.devices.base import SAMPLE_RATE
from bridge.errors import BridgeError
from bridge.speech.asr import AsrWorker
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


def _parse_started_at(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BridgeError(f"--started-at {text!r} is not an ISO 8601 time",
                          "e.g. --started-at 2026-01-31T09:30:00+01:00") from None
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


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


def format_text(conversations: Sequence[Conversation]) -> str:
    if not conversations:
        return "No speech found.\n"
    lines: list[str] = []
    for i, conv in enumerate(conversations, 1):
        lines.append(f"Conversation {i}: {conv.started_at.isoformat(timespec='seconds')} → "
                     f"{conv.finished_at.isoformat(timespec='seconds')} ({conv.language}, "
                     f"{len(conv.segments)} segments)")
        for seg in conv.segments:
            lines.append(f"  [{seg.start:7.2f} → {seg.end:7.2f}] {seg.text}")
        lines.append("")
    return "\n".join(lines)


def cmd_transcribe(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    started_at = _parse_started_at(args.started_at) if args.started_at else None
    worker = AsrWorker(config.asr)
    worker.start()
    try:
        convs = transcribe_files(args.files, config, worker, started_at=started_at, source=args.source,
                                 progress_stream=sys.stderr if sys.stderr.isatty() else None)
    finally:
        worker.stop()
    if args.send:
        from bridge.outbox.commands import send_conversations

        return send_conversations(convs, config, sys.stdout)
    if args.json:
        from bridge.outbox.payload import request_bodies

        bodies = [body for conv in convs for body in request_bodies(conv, config.location)]
        json.dump(bodies, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(convs))
    return 0
