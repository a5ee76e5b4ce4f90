"""What the transcription worker reports about itself: ``status``, state.json, the watchdog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

STUCK_SECONDS = 300.0
"""One window (≤ 29 s of audio) taking longer than this means the worker is stuck, even on a Pi 4
(≈ 3–4 s per call there, performance-notes.md §6)."""


@dataclass
class WorkerHealth:
    alive: bool
    """The worker thread is running."""
    busy_seconds: float
    """How long the current window has been in transcription (0 when idle)."""
    backlog_seconds: float
    """Seconds of speech queued or in transcription."""
    windows_done: int
    errors: int
    last_error: str | None
    retrying: bool = False
    """The last window failed in the backend; windows wait on disk and are retried."""
    failing_since: datetime | None = None
    """When the failures in a row began (None: the last transcription worked)."""
    retry_in: float = 0.0
    """Seconds until the next try while failing."""
    utterances_waiting: int = 0
    """Utterances queued or in transcription."""
    given_up: int = 0
    """Utterances set aside since start after ``[asr] max_attempts`` failures."""

    def problem(self) -> str | None:
        """What a user reads in ``status`` while transcription fails, else None."""
        if self.failing_since is None:
            return None
        since = self.failing_since.astimezone().strftime("%H:%M")
        waiting = f"{self.utterances_waiting} utterance{'s' if self.utterances_waiting != 1 else ''}"
        return (f"transcription failing since {since}: {self.last_error}; {waiting} waiting, "
                f"retrying in {max(self.retry_in, 0.0):.0f} s")

    @property
    def stuck(self) -> bool:
        return self.busy_seconds > STUCK_SECONDS
