"""The daemon's health snapshot: one immutable picture of the running bridge.

The daemon builds a ``HealthSnapshot`` once per housekeeping tick; ``omi-bridge status`` (through
state.json), systemd's ``STATUS=``, the MQTT publisher and the Prometheus collector all read that
same object, so they can never disagree. Counters count since the daemon started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class DeviceHealth:
    """One configured wearable."""

    name: str
    address: str
    kind: str
    connected: bool = False
    battery: int | None = None
    """Battery percent, when the device reports it."""
    firmware: str | None = None
    last_audio_at: datetime | None = None
    notifications: int = 0
    """Audio notifications received."""
    frames: int = 0
    """Codec frames decoded."""
    frames_lost: int = 0
    """Frames missing from the sequence and concealed (PLC or silence)."""
    reconnects: int = 0
    speech_seconds: float = 0.0
    """Speech the VAD kept as utterances, in seconds."""
    button_presses: int = 0
    task_failures: int = 0
    """Times the device's task failed unexpectedly and was restarted."""
    stored_audio_bytes: int | None = None
    """Audio recorded while out of range and still waiting on the device (None: not known)."""
    capture_paused: str | None = None
    """Why capture is paused (the state directory is full: where, how much is free), or None."""


@dataclass(frozen=True)
class AsrHealth:
    """The shared transcription worker."""

    alive: bool = False
    backlog_seconds: float = 0.0
    windows: int = 0
    errors: int = 0
    audio_seconds: float = 0.0
    """Seconds of speech transcribed."""
    busy_seconds: float = 0.0
    """Wall time spent in Whisper calls."""
    failing_since: datetime | None = None
    """When transcription began to fail (None: it works); speech waits on disk meanwhile."""
    problem: str | None = None
    """The failure in a user's words: since when, the error, what waits, the next try."""
    quarantined: int = 0
    """Utterances set aside after [asr] max_attempts failures (kept in quarantine/, never posted)."""


@dataclass(frozen=True)
class OutboxHealth:
    """Delivery to the Omi API."""

    queued: int = 0
    """Conversations waiting to be posted (due now or later)."""
    sent: int = 0
    dead: int = 0
    writes_last_hour: int = 0
    writes_per_hour: int = 0
    requests: Mapping[str, int] = field(default_factory=dict)
    """Answers since start by HTTP status code ("200", "429", ...; "network" for none)."""
    last_posted_at: datetime | None = None

    @property
    def budget_left(self) -> int:
        return max(0, self.writes_per_hour - self.writes_last_hour)


@dataclass(frozen=True)
class HealthSnapshot:
    taken_at: datetime
    started_at: datetime
    ready: bool
    devices: tuple[DeviceHealth, ...] = ()
    asr: AsrHealth = field(default_factory=AsrHealth)
    outbox: OutboxHealth = field(default_factory=OutboxHealth)
    conversations_queued: int = 0
    """Conversations handed to the outbox since start."""

    @property
    def errors(self) -> int:
        """Failed transcriptions, device task failures and conversations the API rejected."""
        return self.asr.errors + self.outbox.dead + sum(d.task_failures for d in self.devices)
