"""Audio a wearable stored while out of range, on its way from the device driver to speech.

The device side (``bridge.devices.omi.sync``) downloads what the pendant recorded offline,
keeps it durable on disk, decodes it and hands it on, record by record, as ``StoredBlock``s with
the wall-clock time each was spoken. The speech side (``bridge.speech.offline``) runs them
through the same VAD, conversation splitting and ASR as live audio. Neither imports the other;
this module is the whole interface.

A *run* is a stretch of recording without a gap longer than the conversation gap: the device
side starts one with ``new_run=True`` (fresh decoder), the speech side a fresh pipeline, so that
re-reading a run from its first record after a crash gives the same conversations with the
same ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class StoredBlock:
    """One stored record's audio."""

    pcm: np.ndarray
    """int16 16 kHz mono samples of the record's frames."""
    started_at: float
    """UTC epoch seconds of the first sample (corrected by the clock offset measured at time sync)."""
    estimated: bool
    """True when the device's clock was not valid and the time is an estimate."""
    position: str
    """Stable name of the record on the device (e.g. ring id and sequence number); the conversation
    ids of offline audio are derived from it, so a re-sync never duplicates a conversation."""
    cursor: int
    """Ordinal of this record in the local download spool; re-reading from a run's first cursor
    reproduces the run."""
    new_run: bool = False
    """The first record of a run (after a recording gap, a clock jump or the end of a sync)."""


class StoredAudioSink(Protocol):
    """Where the device side hands stored audio (implemented by the speech side)."""

    def stored_audio(self, block: StoredBlock) -> None:
        """The next record, in stored order. Called on a worker thread, never on the event loop."""
        ...

    def stored_end(self) -> None:
        """Everything stored on the device has been handed on: finish the open run."""
        ...

    def resume_cursor(self) -> int:
        """Where reading must continue: after a restart, the first record of the run that was not
        finished; records before it are no longer needed on disk."""
        ...


@dataclass
class SyncStatus:
    """One pendant's offline sync, for ``status`` and the health snapshot."""

    protocol: str | None = None
    """"ring", "multi-file", "legacy" or None (unknown firmware: no sync)."""
    state: str = "idle"
    """"idle", "syncing", "done", "failed" or "off"."""
    waiting_bytes: int | None = None
    """Bytes of audio stored on the pendant and not fetched yet (None: not known)."""
    waiting_audio_seconds: float | None = None
    """Rough audio length of ``waiting_bytes`` (≈ 4 kB of Opus per second)."""
    fetched_bytes: int = 0
    """Bytes fetched in the current (or last) sync."""
    total_bytes: int = 0
    """Bytes the current (or last) sync set out to fetch."""
    rate_bytes_per_second: float = 0.0
    last_sync_at: str | None = None
    """ISO time of the last sync that fetched everything the pendant held."""
    last_sync_bytes: int | None = None
    """Bytes that sync brought to disk, counting the cut syncs it finished (None: no sync yet)."""
    last_error: str | None = None
    times_estimated: bool = False
    """Some stored audio had no valid pendant clock: its times are estimates."""
    clock_offset_seconds: float | None = None
    """Bridge clock minus pendant clock, measured at the last time sync."""
    audio_seconds_handed_on: float = 0.0
    """Seconds of stored audio given to speech since the daemon started."""

    @property
    def progress(self) -> float | None:
        return None if not self.total_bytes else min(1.0, self.fetched_bytes / self.total_bytes)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["progress"] = None if self.progress is None else round(self.progress, 3)
        return out
