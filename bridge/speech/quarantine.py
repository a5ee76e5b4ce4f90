"""Speech that never transcribed: kept, with a note of why, for a person to look at.

After ``[asr] max_attempts`` failures of the same utterance its audio is moved (never deleted) to
``<storage>/quarantine/<device>/<conversation>/``, beside a JSON note: when it was said, how long
it is, how often and why it failed, and the audio's format.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

from bridge.core.pcm import SAMPLE_RATE
from bridge.speech import spool
from bridge.speech.conversations import OpenConversation, Utterance

QUARANTINE_DIR = "quarantine"
"""Under [storage] dir: quarantine/<device>/<conversation>/<utterance>.pcm, .json, .error.json."""


def set_aside(root: Path, conv: OpenConversation, utt: Utterance, attempts: int, error: str,
              label: str) -> Path:
    """Move ``utt``'s audio and note under ``root``; returns the folder it is in."""
    dest = root / conv.dir.name
    dest.mkdir(parents=True, exist_ok=True)
    spool.write_json(dest / f"{utt.key}.error.json", {
        "client_session_id": conv.client_session_id, "device": label,
        "utterance_started_at": (conv.started_at + timedelta(
            seconds=utt.offset / SAMPLE_RATE)).isoformat(timespec="milliseconds"),
        "seconds": round(utt.samples / SAMPLE_RATE, 2), "attempts": attempts,
        "error": error, "format": "raw int16 little-endian, 16 kHz, mono"})
    for src in (conv.pcm_path(utt.key), conv.meta_path(utt.key)):
        if src.exists():
            shutil.move(src, dest / src.name)
    return dest
