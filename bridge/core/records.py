"""What flows from speech to delivery: a finished conversation and its segments.

The speech stage produces these; the outbox turns them into request bodies. Times inside a
conversation are seconds from ``started_at`` on the device's exact audio timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bridge.core.kinds import EXTERNAL_SOURCE, DeviceKind

SOURCES: tuple[str, ...] = (*(kind.source for kind in DeviceKind), EXTERNAL_SOURCE)
"""``source`` values we send (omi-api.md §8; never "desktop")."""


@dataclass(frozen=True)
class Segment:
    """One transcribed stretch of speech."""

    text: str
    """Transcript text (never empty after stripping)."""
    start: float
    """Seconds from the conversation start (>= 0)."""
    end: float
    """Seconds from the conversation start (> start)."""


@dataclass(frozen=True)
class Conversation:
    """A finished conversation, ready for the outbox."""

    client_session_id: str
    """Stable id (≤ 200 chars) derived once from the device and the start; the idempotency key."""
    source: str
    """"omi", "frame" or "external_integration"."""
    started_at: datetime
    """Timezone-aware UTC wall-clock time of the conversation's first audio."""
    finished_at: datetime
    """Timezone-aware UTC wall-clock time it closed (> started_at)."""
    language: str
    """Language code (configured, or detected when [asr] language = "auto")."""
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    """Segments sorted by start."""
    device: str = ""
    """Device label for logs and status (not sent)."""
