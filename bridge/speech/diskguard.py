"""Capture paused for a full (or vanished) disk, and resumed by itself when space returns.

A spool write that fails (ENOSPC, EIO, the card gone) pauses capture for that device instead of
writing torn files: the link stays up and the timeline goes on, nothing more is spooled, status
and the journal say where and how much is free, and about once a second of audio the guard looks
again; it resumes once a test file can be written and fsynced with ``DISK_RESUME_FREE_BYTES``
free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bridge.core.pcm import SAMPLE_RATE

_LOGGER = logging.getLogger(__name__)

DISK_CHECK_SECONDS = 1.0
"""While capture is paused for a full disk, how often the free space is looked at (in seconds
of audio, which arrives in real time while a device is connected)."""
DISK_RESUME_FREE_BYTES = 1 << 20
"""Capture resumes with at least this much free: 32 s of speech at 16 kHz, so one utterance does
not fill the disk again at once."""
DISK_PROBE_BYTES = 64 * 1024
"""Written (and removed) before resuming: free space says nothing about a disk that went away."""


@dataclass(frozen=True)
class DiskPause:
    """Capture of one device paused because its spool could not be written."""

    since: datetime
    path: str
    free_bytes: int
    error: str

    def describe(self) -> str:
        """For ``status``: what a user reads."""
        when = self.since.astimezone().strftime("%H:%M")
        return f"capture paused since {when}: {self.error} in {self.path} ({_size(self.free_bytes)} free)"


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


class DiskGuard:
    """One device's spool directory: paused or not, and the look for space while paused."""

    def __init__(self, directory: Path, label: str) -> None:
        self.dir = directory
        self.label = label
        self.paused: DiskPause | None = None
        self.pauses = 0
        """Pauses that ended since start."""
        self._checked = 0

    def pause(self, exc: OSError, samples: int) -> None:
        """A write at stream sample ``samples`` failed with ``exc``."""
        free = _free_bytes(self.dir)
        self.paused = DiskPause(since=datetime.now(UTC), path=str(self.dir), free_bytes=free,
                                error=f"{exc.strerror or exc}")
        self._checked = samples
        _LOGGER.error("%s: cannot write speech to %s (%s, %s free); capture for this device is "
                      "paused and resumes by itself once there is space — free some space there "
                      "or move [storage] dir", self.label, self.dir, exc.strerror or exc,
                      _size(free))

    def back(self, samples: int) -> bool:
        """While paused for the disk: look again (once a second of audio) whether a file can be
        written."""
        pause = self.paused
        assert pause is not None
        if samples - self._checked < DISK_CHECK_SECONDS * SAMPLE_RATE:
            return False
        self._checked = samples
        free = _free_bytes(self.dir)
        if free < DISK_RESUME_FREE_BYTES:
            self.paused = dataclasses.replace(pause, free_bytes=free)
            return False
        probe = self.dir / ".space-probe"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(DISK_PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        paused = (datetime.now(UTC) - pause.since).total_seconds()
        _LOGGER.warning("%s: %s has space again (%s free); capture resumes after %.0f s paused",
                        self.label, self.dir, _size(free), paused)
        self.paused = None
        self.pauses += 1
        return True
