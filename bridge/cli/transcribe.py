"""``omi-bridge transcribe``: audio files into conversations, printed, as JSON bodies, or sent."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from bridge.config import load_config
from bridge.core.errors import BridgeError
from bridge.core.records import Conversation
from bridge.speech.asr.worker import AsrWorker
from bridge.speech.files import transcribe_files


def _parse_started_at(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BridgeError(f"--started-at {text!r} is not an ISO 8601 time",
                          "e.g. --started-at 2026-01-31T09:30:00+01:00") from None
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


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
        if worker.backend is not None:
            # One-shot: an unreachable Wyoming server is an error now, not windows retried forever.
            worker.backend.probe()
        convs = transcribe_files(args.files, config, worker, started_at=started_at, source=args.source,
                                 progress_stream=sys.stderr if sys.stderr.isatty() else None)
    finally:
        worker.stop()
    if args.send:
        from bridge.cli.outbox import send_conversations

        return send_conversations(convs, config, sys.stdout)
    if args.json:
        from bridge.outbox.payload import request_bodies

        bodies = [body for conv in convs for body in request_bodies(conv, config.location)]
        json.dump(bodies, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(convs))
    return 0
