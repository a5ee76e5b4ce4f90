"""Counters and state of one device link, shared by the drivers, the daemon and ``listen``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass
class LinkStats:
    """Counters and state of one device link (shown by ``listen --json`` and ``status``)."""

    codec: int | None = None
    """Codec byte the device reported (omi-device.md §3); None before the first connect."""
    packets: int = 0
    """Audio notifications received."""
    frames: int = 0
    """Codec frames reassembled and decoded."""
    lost_frames: int = 0
    """Frames missing from the index sequence, concealed (PLC or silence)."""
    duplicates: int = 0
    """Notifications seen twice (same index, same bytes) and dropped."""
    malformed: int = 0
    """Notifications too short or with broken fragments, dropped."""
    capture_dropped: int = 0
    """Notifications dropped because audio processing fell about a minute behind (a stalled disk
    or CPU, bridge/audio/capture.py); Omi conceals them as lost frames."""
    reconnects: int = 0
    """Successful connections after the first one."""
    battery: int | None = None
    """Battery percent, when the device reports it."""
    firmware: str | None = None
    """Firmware revision string, when the device reports it."""
    connected: bool = False
    connected_since: datetime | None = None
    last_error: str | None = None
    last_audio_at: datetime | None = None
    samples_written: int = 0
    """Samples written to the sink (the timeline length), concealment and gaps included."""

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("connected_since", "last_audio_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out
